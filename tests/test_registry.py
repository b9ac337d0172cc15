"""
The registries of evgate's seams: every built-in class provides its
interface, and a class that does not is refused when it is registered.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass

from evgate.connectors import CONNECTORS
from evgate.entrypoints import ENTRYPOINTS
from evgate.interfaces import IConnector, IEntrypoint, IPlan, IStore
from evgate.registry import RegistrationError, Registry
from evgate.security import PLANS
from evgate.store import STORES


class BuiltinTests(SynchronousTestCase):
    """
    Every registered class verifies against its interface.
    """

    def test_all(self) -> None:
        """
        Entrypoints, plans, endpoint types and stores: each table holds the
        names the configuration uses, and each class provides its
        interface.
        """
        tables = [(ENTRYPOINTS, IEntrypoint, {"websocket", "sse", "http-get", "http-post", "webhook", "http-proxy"}),
                  (PLANS, IPlan, {"keyless", "api-key", "jwt", "oauth2", "mtls"}),
                  (CONNECTORS, IConnector, {"memory", "kafka", "mqtt5", "http"}),
                  (STORES, IStore, {"memory", "sqlite", "kafka"})]
        for registry, interface, names in tables:
            self.assertEqual(set(registry), names)
            for _, cls in registry.items():
                self.assertTrue(verifyClass(interface, cls))

    def test_entrypointOrder(self) -> None:
        """
        Entrypoints are offered requests most specific first.
        """
        self.assertEqual(list(ENTRYPOINTS), ["websocket", "sse", "http-get", "http-post", "webhook", "http-proxy"])


@implementer(IPlan)
class HalfPlan:
    """
    A plan that forgot authenticate and stop.
    """

    name = "half"
    challenge = ""

    def present(self, request: Any) -> bool:
        return False


class Undeclared:
    """
    A class with every method of a plan that does not say it is one.
    """

    def present(self, request: Any) -> bool:
        return False

    def authenticate(self, request: Any) -> Any:
        return None

    def stop(self) -> None:
        pass


class RefusalTests(SynchronousTestCase):
    """
    A broken registration raises one clear line.
    """

    def test_missingMethods(self) -> None:
        """
        The error names the class, the seam and the methods it lacks, on
        one line; nothing is registered.
        """
        registry: Registry[IPlan] = Registry(IPlan, "plan")
        error = self.assertRaises(RegistrationError, registry.register, "half", HalfPlan)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertIn("tests.test_registry.HalfPlan cannot be the plan 'half'", message)
        self.assertIn("authenticate", message)
        self.assertIn("stop", message)
        self.assertNotIn("half", registry)

    def test_undeclared(self) -> None:
        """
        A class that does not declare the interface is refused too.
        """
        registry: Registry[IPlan] = Registry(IPlan, "plan")
        error = self.assertRaises(RegistrationError, registry.register, "x", Undeclared)
        self.assertIn("Undeclared", str(error))
        self.assertNotIn("\n", str(error))

    def test_nameTaken(self) -> None:
        """
        A name registered for one class cannot be taken by another.
        """
        registry: Registry[IStore] = Registry(IStore, "store")
        memory = STORES.classOf("memory")
        registry.register("memory", memory)
        registry.register("memory", memory)
        error = self.assertRaises(RegistrationError, registry.register, "memory", STORES.classOf("sqlite"))
        self.assertIn("is registered under that name", str(error))
