"""One-line errors for the command line: Hydra's composition errors (unknown config option, misspelled key) are
reported as a single line naming the bad key or value, exit code 2, like outlierlab's own input errors."""
from __future__ import annotations

import os
import sys

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if message.startswith("In '"):  # "In 'config': Could not find 'model/x'" -> drop the location prefix
        message = message.split(": ", 1)[-1]
    if isinstance(error, MissingConfigException):
        options = []
        for line in lines[1:]:
            if line.startswith("Config search path"):
                break
            if not line.startswith("Available options"):
                options.append(line)
        if options:
            message += f" (available: {', '.join(options)})"
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        message = message.rstrip(".") + f": {str(cause).splitlines()[0]}"
    return message


def one_line_errors(hydra_main) -> None:
    """Call a @hydra.main function; unless the user asked for HYDRA_FULL_ERROR, config errors become one line."""
    if os.environ.get("HYDRA_FULL_ERROR"):
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # makes Hydra raise instead of printing, so we can format the error
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(2)
