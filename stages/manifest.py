"""Stage `manifest`: manifest with checksums, parity and dvc.lock provenance (sphana.manifest)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("manifest", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
