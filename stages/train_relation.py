"""Stage `train_relation`: fine-tune the entity-marked relation classifier (sphana.relation)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("train_relation", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
