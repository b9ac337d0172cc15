"""
The real-broker rig as tests see it: the addresses, users, password files and
certificates that C{scripts/dev-services env} prints, for tests of the secured
listeners (Kafka SASL_SSL and SSL, Mosquitto over TLS, Redis over TLS).

Values come from the script itself, run with this process's environment, so
port overrides (C{EVGATE_KAFKA_SASL_PORT} ...) and C{EVGATE_STATE} reach the
tests exactly as they reached C{dev-services up}.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Dict, Iterator, Mapping, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_SERVICES = os.path.join(ROOT, "scripts", "dev-services")


class RigEnvironment(Mapping[str, str]):
    """
    The C{EVGATE_*} values of C{scripts/dev-services env}, read-only, with
    helpers that turn them into client settings.
    """

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)

    def __getitem__(self, name: str) -> str:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"{name} is not among the values of scripts/dev-services env") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def secret(self, fileVariable: str) -> str:
        """
        The password in the file that C{fileVariable} (an C{..._PASSWORD_FILE})
        names, as the client must send it.
        """
        with open(self[fileVariable], encoding="utf-8") as f:
            return f.read().strip()

    def kafkaSasl(self, mechanism: str = "SCRAM-SHA-512", password: Optional[str] = None,
                  caFile: Optional[str] = None) -> Dict[str, str]:
        """
        librdkafka settings for the SASL_SSL listener as the rig's user for
        C{mechanism} (C{SCRAM-SHA-512} or C{PLAIN}); C{password} and
        C{caFile} replace the right ones, to test refusals.
        """
        kind = {"SCRAM-SHA-512": "SCRAM", "PLAIN": "PLAIN"}[mechanism]
        return {
            "bootstrap.servers": self["EVGATE_KAFKA_SASL_BOOTSTRAP"],
            "security.protocol": "SASL_SSL",
            "ssl.ca.location": caFile or self["EVGATE_TLS_CA_FILE"],
            "sasl.mechanism": mechanism,
            "sasl.username": self[f"EVGATE_KAFKA_{kind}_USER"],
            "sasl.password": self.secret(f"EVGATE_KAFKA_{kind}_PASSWORD_FILE") if password is None else password,
        }

    def kafkaSsl(self, cert: str = "EVGATE_TLS_CLIENT", caFile: Optional[str] = None) -> Dict[str, str]:
        """
        librdkafka settings for the SSL (client certificate) listener with the
        certificate and key named by C{cert}: C{EVGATE_TLS_CLIENT},
        C{EVGATE_TLS_EXPIRED} or C{EVGATE_TLS_UNTRUSTED}; C{""} for none.
        """
        config = {
            "bootstrap.servers": self["EVGATE_KAFKA_SSL_BOOTSTRAP"],
            "security.protocol": "SSL",
            "ssl.ca.location": caFile or self["EVGATE_TLS_CA_FILE"],
        }
        if cert:
            config["ssl.certificate.location"] = self[f"{cert}_CERT"]
            config["ssl.key.location"] = self[f"{cert}_KEY"]
        return config


def parseEnvironment(text: str) -> Dict[str, str]:
    """
    The C{NAME=value} assignments in C{text}, as the shell would read them;
    comments and the C{export} line are skipped.
    """
    values = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] == "export":
            continue
        for word in words:
            name, sep, value = word.partition("=")
            if not sep or not name.isidentifier():
                raise ValueError(f"not a shell assignment in dev-services env output: {line!r}")
            values[name] = value
    return values


def rigEnvironment(environ: Optional[Mapping[str, str]] = None) -> RigEnvironment:
    """
    Run C{scripts/dev-services env} (with C{environ}, default this process's
    environment) and return what it printed.
    """
    done = subprocess.run([DEV_SERVICES, "env"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ if environ is None else environ))
    if done.returncode != 0:
        raise AssertionError(f"scripts/dev-services env failed ({done.returncode}):\n{done.stderr}")
    return RigEnvironment(parseEnvironment(done.stdout))
