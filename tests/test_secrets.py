"""
Tests for L{evgate.secrets}: secret files, systemd credentials, and the
C{-file} forms of the options that use them.
"""

from __future__ import annotations

import os
from typing import Dict

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from evgate.ini import ConfigError, SectionReader
from evgate.secrets import readSecretBytes, readSecretText, resolvePath, secretOption


class SecretFileTests(SynchronousTestCase):
    """
    Reading a secret from the file a C{-file} key names.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.configPath = os.path.join(self.directory, "evgate.ini")

    def section(self, **values: str) -> SectionReader:
        return SectionReader(self.configPath, "endpoint:e", {k.replace("_", "-"): v for k, v in values.items()})

    def write(self, name: str, content: bytes, mode: int = 0o600) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def credentials(self, files: Dict[str, bytes]) -> str:
        directory = os.path.join(self.directory, "credentials")
        os.makedirs(directory)
        for name, content in files.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(content)
            os.chmod(os.path.join(directory, name), 0o400)
        self.patch(os, "environ", dict(os.environ, CREDENTIALS_DIRECTORY=directory))
        return directory

    def test_oneTrailingNewlineStripped(self) -> None:
        """
        One trailing newline (LF or CRLF) is removed; other whitespace is
        part of the secret.
        """
        self.write("a", b" s3cret \n\n")
        self.write("b", b"s3cret\r\n")
        self.assertEqual(readSecretBytes(self.section(password_file="a"), "password-file"), b" s3cret \n")
        self.assertEqual(readSecretText(self.section(password_file="b"), "password-file"), "s3cret")

    def test_relativeToConfig(self) -> None:
        """
        A relative path is relative to the configuration file's directory,
        not the working directory.
        """
        self.write("pw", b"x")
        self.assertEqual(resolvePath(self.section(), "password-file", "pw"), os.path.join(self.directory, "pw"))

    def test_credential(self) -> None:
        """
        C{credential:NAME} and C{%d/NAME} read C{$CREDENTIALS_DIRECTORY/NAME}.
        """
        self.credentials({"kafka-password": b"from-systemd\n"})
        for value in ("credential:kafka-password", "%d/kafka-password"):
            section = self.section(password_file=value)
            self.assertEqual(readSecretText(section, "password-file"), "from-systemd")

    def test_credentialWithoutDirectory(self) -> None:
        """
        A credential while C{$CREDENTIALS_DIRECTORY} is unset is an error
        naming file, section and key.
        """
        environ = dict(os.environ)
        environ.pop("CREDENTIALS_DIRECTORY", None)
        self.patch(os, "environ", environ)
        e = self.assertRaises(ConfigError, readSecretText, self.section(password_file="credential:pw"),
                              "password-file")
        self.assertEqual((e.path, e.section, e.key), (self.configPath, "endpoint:e", "password-file"))
        self.assertIn("CREDENTIALS_DIRECTORY", e.message)

    def test_credentialName(self) -> None:
        """
        A credential name is one file name: no path escapes the directory.
        """
        self.credentials({})
        for value in ("credential:", "credential:../etc/shadow", "%d/a/b"):
            self.assertRaises(ConfigError, resolvePath, self.section(), "password-file", value)

    def test_unreadable(self) -> None:
        """
        A missing or empty file is an error that names the file.
        """
        e = self.assertRaises(ConfigError, readSecretText, self.section(password_file="missing"), "password-file")
        self.assertIn(os.path.join(self.directory, "missing"), e.message)
        self.write("empty", b"\n")
        e = self.assertRaises(ConfigError, readSecretText, self.section(password_file="empty"), "password-file")
        self.assertIn("is empty", e.message)

    def test_openToEveryoneWarns(self) -> None:
        """
        A world-readable secret file is read, with one warning naming it.
        """
        path = self.write("open", b"pw", mode=0o644)
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        for _ in range(2):
            self.assertEqual(readSecretText(self.section(password_file="open"), "password-file"), "pw")
        warnings = [e for e in seen if e.get("path") == path]
        self.assertEqual(len(warnings), 1)
        self.assertIn("chmod o-rwx", warnings[0]["log_format"])

    def test_secretOption(self) -> None:
        """
        A secret is given inline or in a file, not both.
        """
        self.write("pw", b"filed\n")
        self.assertEqual(secretOption(self.section(password="inline"), "password"), "inline")
        self.assertEqual(secretOption(self.section(password_file="pw"), "password"), "filed")
        self.assertIsNone(secretOption(self.section(), "password"))
        e = self.assertRaises(ConfigError, secretOption, self.section(password="a", password_file="pw"), "password")
        self.assertEqual(e.key, "password-file")
        self.assertRaises(ConfigError, secretOption, self.section(), "password", required=True)
