"""Stage `index`: the corpus index, every chunk embedded and its relations found (sphana.index)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("index", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
