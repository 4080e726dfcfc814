"""Stage `train_llm`: train the Qwen2-architecture generator with its tokenizer (sphana.llm)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("train_llm", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
