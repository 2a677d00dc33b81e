"""Who is asking and what they may see: identities and tokens, sessions, access decisions and
their audit (``gate``), views (identified / de-identified / metadata) and the officers' tools
that explain them."""
