"""Stage `export_llm`: ONNX with the KV cache, INT8, generation parity gates (sphana.export.llm)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("export_llm", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
