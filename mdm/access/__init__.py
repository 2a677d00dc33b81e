"""Who is asking and what they may see: identities and tokens, sessions, access decisions,
views (identified / de-identified / metadata) and the officers' tools that explain them."""
