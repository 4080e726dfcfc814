"""Stage `export_relation`: ONNX fp32 + INT8 behind the parity gates (sphana.export.relation)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("export_relation", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
