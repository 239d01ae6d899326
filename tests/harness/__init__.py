"""Test harness: real servers and real processes, loopback only, every wait bounded.

- ``pg``       PgCluster: throwaway PostgreSQL clusters (auth trust/scram/md5/password/cert, TLS)
- ``mariadb``  MariaDbServer: throwaway MariaDB servers (native password, TLS, connection counting)
- ``firewall`` Firewall: a TCP+UDP forwarder that can black-hole either protocol (transport fallback)
- ``procs``    Proc (subprocess with logs, bounded waits), free_port, wait_port, is_listening,
               open_fds/open_sockets, hd_argv/connector_argv
- ``edge``     EdgeProc (`hd edge`), ConnectorProc (`hd-connector`), AccessTcpProc (`hd access tcp`)
- ``origins``  EchoServer, SinkServer, SourceServer, SlowReader, RefusingPort, BlackHole, in_thread
- ``sshd``     SshServer (asyncssh)
Fixtures built on them are in tests/conftest.py.
"""
