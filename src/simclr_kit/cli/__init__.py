"""The ``simclr`` command: :func:`main` parses the command line (:mod:`simclr_kit.cli.parser`)
and runs the sub-command (:mod:`simclr_kit.cli.commands`).

Every user error (UserError) becomes one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Sequence

from simclr_kit.cli.parser import build_parser, command_parser
from simclr_kit.errors import UserError

# Errors of the machine rather than of the code: a full disk, a read-only or forbidden folder.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_FULL_DISK = os.strerror(errno.ENOSPC)  # "No space left on device"


def _environment_error(err: BaseException) -> str | None:
    """One line for an error of the machine (a full disk, a read-only or forbidden folder),
    also when a library wrapped it without its errno (torch.save, pyarrow); else None."""
    if isinstance(err, OSError) and err.errno in _ENVIRONMENT_ERRNOS:
        where = f"{err.filename}: " if err.filename else ""
        full = " (free some space, then run again)" if err.errno in (errno.ENOSPC,
                                                                      errno.EDQUOT) else ""
        return f"{where}{err.strerror}{full}"
    if isinstance(err, (OSError, RuntimeError)) and _FULL_DISK in str(err):
        return f"{_FULL_DISK} ({str(err).splitlines()[0][:160]}): free some space, then run again"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the sub-command's parser, which knows the flags to suggest
            command_parser(parser, args.command).unrecognized(extra)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if args.debug:
            traceback.print_exc()
        print(f"simclr {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        code = getattr(err, "exit_code", None)  # a run or a decode stopped by a signal
        machine = _environment_error(err) if code is None else None
        if machine is not None:
            if args.debug:
                traceback.print_exc()
            print(f"simclr {args.command}: error: {machine}", file=sys.stderr)
            return 2
        if code is None:
            raise
        print(f"simclr {args.command}: {err}", file=sys.stderr)
        return int(code)
    except KeyboardInterrupt:
        print(f"simclr {args.command}: interrupted", file=sys.stderr)
        return 130
