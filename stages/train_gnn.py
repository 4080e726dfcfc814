"""Stage `train_gnn`: train the GGNN ranker with a ListNet loss (sphana.gnn)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("train_gnn", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
