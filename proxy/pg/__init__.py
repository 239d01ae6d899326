"""PostgreSQL side of the proxy: wire protocol (`protocol`), authentication (`auth`), sessions."""
