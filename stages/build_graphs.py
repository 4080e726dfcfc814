"""Stage `build_graphs`: candidate subgraphs for the graph ranker (sphana.gnn.build)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("build_graphs", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
