"""The key service: object keys split M-of-N across key servers that check token and policy.

``shares`` splits and combines keys (Shamir), ``seal`` seals a share to a server's public scope
key, ``store`` is a server's key store file, ``server`` the ASGI app served by hypercorn on
trio, and ``client`` the :class:`~mdm.keyservice.client.KeyServiceProvider` a mount uses.
See docs/KEYSERVICE.md.
"""
