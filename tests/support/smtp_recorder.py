"""An aiosmtpd handler for herald's end-to-end tests.

Every message the server accepts is written to the folder given on the command line as
NNNNNN.eml (the exact bytes received) beside NNNNNN.json (the envelope and the client's
address), so a test can parse what really crossed the wire.

Run: python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_recorder.Recorder FOLDER
"""

import itertools
import json
import os


class Recorder:
    def __init__(self, folder):
        self.folder = folder
        self.counter = itertools.count(1)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("Recorder takes one argument: the folder to write messages to")
        return cls(args[0])

    async def handle_DATA(self, server, session, envelope):
        number = next(self.counter)
        base = os.path.join(self.folder, f"{number:06d}")
        with open(base + ".json", "w") as meta:
            json.dump(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "peer": list(session.peer),
                },
                meta,
            )
        with open(base + ".eml.tmp", "wb") as message:
            message.write(envelope.original_content)
        os.rename(base + ".eml.tmp", base + ".eml")
        return f"250 2.0.0 Ok: queued as {number}"
