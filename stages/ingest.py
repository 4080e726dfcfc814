"""Stage `ingest`: read documents, normalize, chunk -> chunks.jsonl (sphana.ingest)."""

import hydra
from omegaconf import DictConfig

from sphana import entry


@hydra.main(config_path=entry.CONFIG_PATH, config_name="params", version_base=None)
def main(params: DictConfig) -> None:
    entry.run("ingest", params)


if __name__ == "__main__":
    entry.hydra_args()
    main()
