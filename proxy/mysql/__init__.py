"""MySQL / MariaDB side of the proxy: wire protocol (`protocol`), authentication (`auth`)."""
