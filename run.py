"""outlierlab entry point:  python run.py +exp=NAME [model=NAME] [key=value ...]  (see README.md)."""
import hydra
from omegaconf import DictConfig

from outlierlab.cli import one_line_errors
from outlierlab.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    one_line_errors(main)
