"""Dataflow Flex Template launcher: template parameters -> ``dicom-deid run``.

The Flex Template launcher runs this file with every template parameter as ``--name=value``
plus Dataflow's own options (``--runner``, ``--project``, ``--region``, ``--temp_location``,
``--sdk_container_image``...). Parameters named in ``metadata.json`` become the CLI's options
(``max_input_bytes`` -> ``--max-input-bytes``; ``input`` is comma-separated; ``true``/``false``
switch flags); everything else goes to Beam untouched, exactly as on the command line.

The launcher waits for the job and then writes the run summary from the manifest, as a local
run does (``{output}/summaries/run-{id}.json``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
#: template parameters that are CLI switches (values true/false)
FLAGS = {"strict", "incremental"}


def parameter_names() -> list[str]:
    with open(os.path.join(HERE, "metadata.json")) as f:
        return [p["name"] for p in json.load(f)["parameters"]]


def to_cli_argv(argv: Sequence[str]) -> list[str]:
    """``--name=value`` template arguments -> ``dicom-deid run`` arguments."""
    names = set(parameter_names())
    cli, beam = [], []
    it = iter(argv)
    for arg in it:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name not in names:
            beam.append(arg)
            continue
        if not eq:  # "--name value"
            value = next(it, "")
        option = "--" + name.replace("_", "-")
        if name in FLAGS:
            if value.strip().lower() == "true":
                cli.append(option)
        elif name == "input":
            cli += [option, *[v.strip() for v in value.split(",") if v.strip()]]
        elif value != "":
            cli += [option, value]
    return ["run", *cli, "--no-progress", *beam]


def main(argv: Sequence[str] | None = None) -> int:
    from dicom_deid import cli
    return cli.main(to_cli_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
