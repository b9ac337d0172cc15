from setuptools import setup

# Everything is declared in setup.cfg; the plugin file lives under
# twisted/plugins, which must be a plain directory (no __init__.py) so that
# Twisted's plugin system finds it beside Twisted's own.
setup(
    packages=[
        "evgate",
        "evgate.admin",
        "evgate.connectors",
        "evgate.entrypoints",
        "evgate.portal",
        "evgate.proxy",
        "evgate.security",
        "evgate.store",
        "evgate.webhook",
        "twisted.plugins",
    ],
    package_data={"evgate.admin": ["static/*"], "evgate.portal": ["static/*"]},
)
