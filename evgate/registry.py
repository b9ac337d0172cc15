"""
Tables of the classes that implement evgate's seams, by the name the
configuration uses (an entrypoint, a plan, an endpoint type, a store).

Registering a class runs L{zope.interface.verify.verifyClass} against the
seam's interface, so that a class that lacks a method (or an attribute the
interface declares and the class sets at class level) is refused when it
is registered, with one line naming the class and what it lacks, rather
than failing on the first request that needs the missing method.

The built-in classes of a table are registered by a loader that the table
runs on first use: the modules that define them import
L{evgate.gateway} and friends, which import the packages that own these
tables, so registering them when the package is imported would make an
import cycle.  First use is node start-up (L{evgate.node.buildApis},
L{evgate.connectors.buildConnector}), so a broken built-in still stops
the node before it serves anything.
"""

from __future__ import annotations

from typing import Callable, Dict, Generic, Iterable, Iterator, Optional, Tuple, TypeVar

from zope.interface.exceptions import BrokenImplementation, BrokenMethodImplementation, DoesNotImplement, Invalid
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyClass

T = TypeVar("T")


class RegistrationError(Exception):
    """
    A class was registered for a seam whose interface it does not
    provide.  The message is one line: the class, the seam and what it
    lacks.
    """


def _lacks(interface: InterfaceClass, error: Invalid) -> str:
    # zope's messages are long and may span lines; a start-up error is
    # read in a journal, one line per problem.
    if isinstance(error, DoesNotImplement):
        return f"it does not declare @implementer({interface.__name__})"
    errors = list(getattr(error, "exceptions", None) or [error])
    missing = [str(e.name) for e in errors if isinstance(e, BrokenImplementation)]
    wrong = [f"{getattr(e.method, '__name__', e.method)} ({e.mess})" for e in errors
             if isinstance(e, BrokenMethodImplementation)]
    parts = []
    if missing:
        parts.append(f"it lacks {', '.join(missing)}")
    if wrong:
        parts.append(f"its {', '.join(wrong)} do not match {interface.__name__}")
    return "; ".join(parts) if parts else " ".join(str(error).split())


class Registry(Generic[T]):
    """
    A table of name -> class (with its factory) for one seam.

    @ivar interface: the interface every class registered must provide.
    @ivar what: what a name names, for messages (C{"entrypoint"}).
    """

    def __init__(self, interface: InterfaceClass, what: str,
                 builtins: Optional[Callable[["Registry[T]"], None]] = None) -> None:
        self.interface = interface
        self.what = what
        self._builtins = builtins
        self._entries: Dict[str, Tuple[type, Callable[..., T]]] = {}

    def register(self, name: str, cls: type, factory: Optional[Callable[..., T]] = None) -> None:
        """
        Register C{cls} under C{name}; C{factory} makes its instances
        (C{cls} itself by default).

        @raise RegistrationError: if C{cls} does not implement the
            interface, or C{name} is taken by another class.
        """
        where = f"{cls.__module__}.{cls.__qualname__}"
        try:
            verifyClass(self.interface, cls)
        except Invalid as e:
            raise RegistrationError(f"{where} cannot be the {self.what} {name!r}: "
                                    f"{_lacks(self.interface, e)}") from None
        known = self._entries.get(name)
        if known is not None and known[0] is not cls:
            raise RegistrationError(f"{where} cannot be the {self.what} {name!r}: "
                                    f"{known[0].__module__}.{known[0].__qualname__} is registered under that name")
        self._entries[name] = (cls, factory if factory is not None else cls)

    def _loaded(self) -> Dict[str, Tuple[type, Callable[..., T]]]:
        if self._builtins is not None:
            builtins, self._builtins = self._builtins, None
            builtins(self)
        return self._entries

    def classOf(self, name: str) -> type:
        """
        The class registered as C{name}.

        @raise KeyError: if there is none.
        """
        return self._loaded()[name][0]

    def factory(self, name: str) -> Callable[..., T]:
        """
        What makes an instance of the class registered as C{name}.

        @raise KeyError: if there is none.
        """
        return self._loaded()[name][1]

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._loaded()))

    def items(self) -> Iterable[Tuple[str, type]]:
        """
        Every C{(name, class)}, in the order they were registered.
        """
        return [(name, entry[0]) for name, entry in self._loaded().items()]

    def __repr__(self) -> str:
        return f"<Registry of {self.what}s: {', '.join(self._entries) or 'not loaded'}>"

