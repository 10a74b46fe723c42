"""Runs moto's KMS-protocol server on 127.0.0.1 for the test harness.

Prints the port it bound (port 0 = any free port) on the first line of
stdout, then serves until its standard input reaches end of file, which
happens when the process that started it exits, however it exits. So a test
binary never leaves a server behind.
"""

import logging
import sys

from moto.server import ThreadedMotoServer


def main() -> None:
    # One access-log line per KMS call drowns the test and benchmark output;
    # errors still show.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    print(port, flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
