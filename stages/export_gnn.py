"""Stage `export_gnn`: ONNX with dynamic nodes and edges, parity gates (sphana.export.gnn)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("export_gnn", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
