"""Stage `evaluate`: the built release answers the held-out questions end to end (sphana.query)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("evaluate", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
