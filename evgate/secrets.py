"""
Secrets kept in files, so that no password, token or key needs to sit in
evgate.ini: every secret option has a C{-file} form, and this module is the
one place that reads them.

Where a C{-file} value points
=============================

 - C{credential:NAME} (or C{%d/NAME}, the way a systemd unit writes it): the
   systemd credential NAME, that is C{$CREDENTIALS_DIRECTORY/NAME}, which
   systemd fills from C{LoadCredential=} / C{LoadCredentialEncrypted=} /
   C{SetCredential=}.  It is a configuration error when the variable is not
   set (the gateway is not running under such a unit).
 - an absolute path (C{~} is expanded);
 - a relative path: relative to the directory of the configuration file,
   so that a configuration and its secrets can move together.

What a secret file holds
========================

The secret exactly, with one trailing newline (C{\\n} or C{\\r\\n}) removed,
because C{echo secret > file} and editors add one.  Other whitespace is
kept: it may be part of the secret.  An empty file is an error.

A secret file readable by every user of the machine (any "other"
permission bit set, mode C{0644} say) is read, with one warning naming the
file and the C{chmod} that fixes it.  It is not refused: Kubernetes mounts
secret volumes 0644 by default, inside a container where no other user
exists, and refusing would break those deployments for no gain.
Group-readable files (C{root:evgate 0640}) are the usual layout on a VM,
and systemd credentials are always private to the service.

Every error is a L{ConfigError} naming the file, section and key.
"""

from __future__ import annotations

import os
import stat
from typing import Optional, Set

from twisted.logger import Logger

from evgate.ini import ConfigError, SectionReader

CREDENTIAL_PREFIX = "credential:"
SYSTEMD_PREFIX = "%d/"
CREDENTIAL_PREFIXES = (CREDENTIAL_PREFIX, SYSTEMD_PREFIX)
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"

_log = Logger()
# Files warned about, so that a reload does not repeat it.
_warned: Set[str] = set()


def resolvePath(section: SectionReader, key: str, value: str) -> str:
    """
    The file that the value C{value} of C{key} names (see the module's
    docstring): a systemd credential, an absolute path, or a path relative
    to the configuration file.

    @raise ConfigError: for a credential while C{$CREDENTIALS_DIRECTORY} is
        unset, or an empty or unsafe credential name.
    """
    for prefix in CREDENTIAL_PREFIXES:
        if value.startswith(prefix):
            name = value[len(prefix):]
            if not name or "/" in name or name in (".", ".."):
                raise section.error(key, f"{value!r}: a credential is named by one file name "
                                         f"({CREDENTIAL_PREFIX}NAME)")
            directory = os.environ.get(CREDENTIALS_VARIABLE)
            if not directory:
                raise section.error(key, f"{value!r} names a systemd credential, but ${CREDENTIALS_VARIABLE} "
                                         "is not set (run under a unit with LoadCredential=, or give a path)")
            return os.path.join(directory, name)
    path = os.path.expanduser(value)
    if not os.path.isabs(path) and not section.path.startswith("<"):
        path = os.path.join(os.path.dirname(os.path.abspath(section.path)), path)
    return path


def readSecretBytes(section: SectionReader, key: str) -> bytes:
    """
    The secret in the file that C{key} names, as bytes, without one
    trailing newline.

    @raise ConfigError: when the key is missing, or the file is unreadable
        or empty.
    """
    value = section.get(key)
    path = resolvePath(section, key, value)
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            content = f.read()
    except OSError as e:
        raise section.error(key, f"cannot read {path}: {e.strerror or e}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH) and path not in _warned:
        _warned.add(path)
        _log.warn("{where}: the secret file {path} is open to every user (mode {mode:04o}); "
                  "chmod o-rwx {path}", where=f"{section.path} [{section.name}] {key}", path=path,
                  mode=stat.S_IMODE(mode))
    if content.endswith(b"\r\n"):
        content = content[:-2]
    elif content.endswith(b"\n"):
        content = content[:-1]
    if not content:
        raise section.error(key, f"{path} is empty")
    return content


def readSecretText(section: SectionReader, key: str) -> str:
    """
    Like L{readSecretBytes}, as UTF-8 text.
    """
    content = readSecretBytes(section, key)
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        raise section.error(key, "the secret is not UTF-8 text") from None


def secretOption(section: SectionReader, key: str, required: bool = False) -> Optional[str]:
    """
    The secret of C{key}, given either inline (C{key = value}) or in a file
    (C{key-file = path}); setting both is an error.

    @return: the secret, or L{None} when neither is set and it is not
        C{required}.
    """
    fileKey = key + "-file"
    inline = section.get(key, None)
    if section.has(fileKey):
        if inline is not None:
            raise section.error(fileKey, f"set {key} or {fileKey}, not both")
        return readSecretText(section, fileKey)
    if inline is None and required:
        raise section.error(key, f"missing required key (or {fileKey})")
    return inline  # type: ignore[no-any-return]


__all__ = [
    "CREDENTIAL_PREFIX", "CREDENTIAL_PREFIXES", "ConfigError", "readSecretBytes", "readSecretText", "resolvePath",
    "secretOption",
]
