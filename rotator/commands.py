"""The `rotator` command lines that messages suggest to an operator, written so that
they run as shown: an IAM user name may begin with `-` (IAM allows `[A-Za-z0-9+=,.@_-]`),
which the command line would read as an option unless it follows `--`."""

from __future__ import annotations

__all__ = ["suggested"]


def suggested(verb: str, user_name: str, *options: str) -> str:
    """`rotator VERB USER [OPTIONS]`; for a user name that looks like an option, the
    options first and the name after `--` (`rotator reactivate --key AKIA… -- -svc`)."""
    if user_name.startswith("-"):
        return " ".join(("rotator", verb, *options, "--", user_name))
    return " ".join(("rotator", verb, user_name, *options))
