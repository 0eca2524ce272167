"""Files that hold secrets or private state: created owner-only whatever the umask (0700
directories, 0600 files), and secret files refused when someone else could have chosen them.

A secret file relay reads (a token, the SDK-key secret) must not be writable by group or others
and must belong to this process's user or to root: otherwise whoever could write it picked the
secret (a token planted before the first start would open the admin API to them). Kubernetes
mounts a Secret volume as root-owned files behind symlinks (mode 0644, or the volume's
defaultMode): those are accepted. Being readable by others is not refused (that is the volume's
choice), only being writable.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from relay.config import ConfigError

log = logging.getLogger("relay.files")

_warned: set[str] = set()  # directories already reported as open to others


class SecretFileError(ConfigError):
    """A secret file is missing, unsafe or unusable: one line for the user."""


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


def make_private_dir(path: Path) -> None:
    """Create `path` and its missing parents 0700. A directory that exists already (maybe the
    user's `.`) is left as it is, with a warning when group or others can write to it."""
    missing: list[Path] = []
    walk = path
    while not os.path.lexists(walk) and walk != walk.parent:
        missing.append(walk)
        walk = walk.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:  # made meanwhile by another process: as if it existed
            continue
        os.chmod(directory, 0o700)  # mkdir's mode went through the umask
    if not missing:
        mode = path.stat().st_mode
        key = str(path.resolve())
        if mode & 0o022 and key not in _warned:
            _warned.add(key)
            log.warning("the data dir %s is writable by %s (mode %s): anyone who can write "
                        "there can replace relay's store and secrets; chmod go-w it",
                        path, _who(mode), oct(stat.S_IMODE(mode)))


def open_private(path: Path, flags: int) -> int:
    """Open (creating it 0600) a file of relay's own: the store, its lock. One an older
    version left readable by others is made 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private(path: Path) -> None:
    """`path` is 0600 if it exists (a file of relay's own that something else created)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def create_secret_file(path: Path, text: str) -> bool:
    """Write `text` and a newline to a new file `path`, 0600, all at once: a reader never sees
    it half written, and whatever is at `path` already (even a dangling symlink) is never
    replaced. False if `path` existed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        _fill(fd, text)
        try:
            os.link(tmp, path)  # fails if path exists: no replace, unlike rename
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            return _create_in_place(path, text)  # a filesystem without hard links
    finally:
        os.unlink(tmp)
    return True


def _create_in_place(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        return False
    _fill(fd, text)
    return True


def _fill(fd: int, text: str) -> None:
    """Write a new private file's one line, durably, and close it."""
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of a file holding a secret (symlinks followed). Raises SecretFileError when it
    is missing or unsafe: writable by group or others, or owned by another user than this
    process's or root (whoever could write it chose the secret)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise SecretFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        euid = os.geteuid()
        if info.st_uid not in (euid, 0):
            raise SecretFileError(
                f"{what} {path} belongs to uid {info.st_uid}, not to this user ({euid}) or "
                "root: refused (someone else chose its content)")
        if info.st_mode & 0o022:
            raise SecretFileError(
                f"{what} {path} is writable by {_who(info.st_mode)} "
                f"(mode {oct(stat.S_IMODE(info.st_mode))}): refused; chmod go-w {path}")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as exc:
        raise SecretFileError(f"cannot read {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def read_secret_file(path: str | Path, what: str) -> str:
    """The one-line secret in `path` (checked as `read_private_bytes` does), without its
    trailing newline. Raises SecretFileError when it is empty or not one line, too."""
    try:
        text = read_private_bytes(path, what).decode()
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SecretFileError(f"{what} {path} is empty")
    if "\n" in text or "\r" in text:
        raise SecretFileError(f"{what} {path} holds more than one line")
    return text
