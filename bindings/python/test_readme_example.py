"""Runs the README's Python example (the bot) against stand-ins for a homeserver and PostHog.

    python test_readme_example.py BOT.py

Run by scripts/test-wheel.sh with the virtual environment's interpreter, where only the wheel and
posthog are installed; BOT.py is the README block after `<!-- snippet: python-example -->`, exactly
as written. One local HTTP server plays both the homeserver (keys/upload, sync, keys/query,
keys/claim, sendToDevice) and PostHog (/batch/). The first /sync delivers, encrypted for the keys the
bot uploaded: an m.dummy from Carol built on one of the bot's one-time keys, a message from Alice
built on the same key (the server handed it out twice: UnknownOneTimeKey, and Alice's device is
known, so the bot must recover the session), a plain event and a Megolm event sent as to-device
(UnsupportedAlgorithm). The bot runs twice: as a new device, then restarted on the same store.
Exits non-zero, naming what differed, if anything did.
"""

import asyncio
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from to_device_crypto import OlmMachine

BOT_USER, BOT_DEVICE = "@bot:example.org", "BOTDEVICE"
MEGOLM_AS_TO_DEVICE = {"type": "m.room.encrypted", "sender": "@mallory:example.org", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
PLAIN = {"type": "m.new_device", "sender": "@dave:example.org", "content": {}}


class Peers:
    """Carol and Alice, the devices that send the bot to-device messages."""

    def __init__(self):
        self.carol = self.alice = None
        self.alice_upload = None

    async def start(self):
        self.carol = await OlmMachine.open_in_memory("@carol:example.org", "CAROLDEVICE")
        self.alice = await OlmMachine.open_in_memory("@alice:example.org", "ALICEDEVICE")
        self.alice_upload = json.loads(await self.alice.keys_for_upload())

    async def batch(self, bot_upload):
        one_key = dict(list(bot_upload["one_time_keys"].items())[:1])
        served = json.dumps({"device_keys": bot_upload["device_keys"], "one_time_keys": one_key})
        carol = json.loads(await self.carol.encrypt_for(served, "m.dummy", json.dumps({"from": "carol"})))[0]
        alice = json.loads(await self.alice.encrypt_for(served, "m.dummy", json.dumps({"from": "alice"})))[0]
        return [carol, alice, PLAIN, MEGOLM_AS_TO_DEVICE]


class World:
    """What the stand-ins saw, and what they answer."""

    def __init__(self, peers):
        self.peers = peers
        self.lock = threading.Lock()
        self.uploads, self.syncs, self.queries, self.claims, self.to_device, self.posthog = [], [], [], [], [], []
        self.unknown = []
        self.batch = None

    def answer(self, method, url, body):
        path = urllib.parse.urlsplit(url).path
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        with self.lock:
            if path.endswith("/batch/") or path.endswith("/batch"):
                self.posthog.extend(body.get("batch", []))
                return {"status": 1}
            if path == "/_matrix/client/v3/keys/upload":
                self.uploads.append(body)
                return {"one_time_key_counts": {"signed_curve25519": len(body.get("one_time_keys", {}))}}
            if path == "/_matrix/client/v3/sync":
                self.syncs.append(query.get("since"))
                if query.get("since") is None:
                    self.batch = asyncio.run(self.peers.batch(self.uploads[0]))
                    # Carol claimed one of the 25 keys; the fallback key is unused.
                    return self.sync("s1", self.batch, 24)
                return self.sync("s2" if query["since"] == "s1" else query["since"], [], 25)
            if path == "/_matrix/client/v3/keys/query":
                self.queries.append(body)
                alice = self.peers.alice_upload["device_keys"]
                wanted = body.get("device_keys", {})
                devices = {"@alice:example.org": {"ALICEDEVICE": alice}} if "@alice:example.org" in wanted else {}
                return {"device_keys": devices, "failures": {}}
            if path == "/_matrix/client/v3/keys/claim":
                self.claims.append(body)
                key = dict(list(self.peers.alice_upload["one_time_keys"].items())[:1])
                return {"one_time_keys": {"@alice:example.org": {"ALICEDEVICE": key}}, "failures": {}}
            if path.startswith("/_matrix/client/v3/sendToDevice/"):
                self.to_device.append((method, path, body))
                return {}
            self.unknown.append((method, path))
            return {}

    @staticmethod
    def sync(next_batch, events, published):
        return {
            "next_batch": next_batch,
            "to_device": {"events": events},
            "device_one_time_keys_count": {"signed_curve25519": published},
            "device_unused_fallback_key_types": ["signed_curve25519"],
        }


def serve(world):
    class Handler(BaseHTTPRequestHandler):
        def handle_one(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
            body = json.loads(raw) if raw else {}
            answer = json.dumps(world.answer(self.command, self.path, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = do_POST = do_PUT = handle_one

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def run_bot(bot, workdir, base):
    env = dict(
        os.environ,
        MATRIX_HOMESERVER=base,
        MATRIX_ACCESS_TOKEN="syt_stand_in",
        MATRIX_USER_ID=BOT_USER,
        MATRIX_DEVICE_ID=BOT_DEVICE,
        STORE_PASSPHRASE="correct horse battery staple",
        POSTHOG_API_KEY="phc_stand_in",
        POSTHOG_HOST=base,
    )
    return subprocess.run([sys.executable, bot], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)


def main():
    bot = os.path.abspath(sys.argv[1])
    peers = Peers()
    asyncio.run(peers.start())
    world = World(peers)
    server = serve(world)
    base = "http://127.0.0.1:%d" % server.server_address[1]
    problems = []

    def expect(what, actual, expected):
        if actual != expected:
            problems.append("%s: expected %r, got %r" % (what, expected, actual))

    with tempfile.TemporaryDirectory() as workdir:
        first = run_bot(bot, workdir, base)
        print(first.stdout, end="")
        expect("first run: exit status", first.returncode, 0)
        expect("first run: stderr", first.stderr.strip(), "")
        expect(
            "first run: printed results",
            first.stdout.splitlines(),
            [
                "decrypted m.dummy from @carol:example.org",
                "failed ToDeviceFailedToDecrypt_UnknownOneTimeKey",
                "failed ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
            ],
        )
        expect("first run: syncs (since)", world.syncs, [None, "s1"])
        expect("uploads", len(world.uploads), 2)
        if world.uploads:
            first_upload = world.uploads[0]
            expect("first upload: one-time keys", len(first_upload.get("one_time_keys", {})), 25)
            expect("first upload: fallback keys", len(first_upload.get("fallback_keys", {})), 1)
            expect("first upload: device", first_upload.get("device_keys", {}).get("device_id"), BOT_DEVICE)
        if len(world.uploads) > 1:
            expect("top-up upload after the server counted 24: one-time keys", len(world.uploads[1].get("one_time_keys", {})), 1)
        expect(
            "keys/query",
            world.queries,
            [{"device_keys": {"@alice:example.org": [], "@carol:example.org": [], "@dave:example.org": [], "@mallory:example.org": []}}],
        )
        expect("keys/claim", world.claims, [{"one_time_keys": {"@alice:example.org": {"ALICEDEVICE": "signed_curve25519"}}}])
        expect("sendToDevice requests", len(world.to_device), 1)
        if world.to_device:
            method, path, body = world.to_device[0]
            expect("sendToDevice method and path", (method, path.rsplit("/", 1)[0]), ("PUT", "/_matrix/client/v3/sendToDevice/m.room.encrypted"))
            content = body["messages"]["@alice:example.org"]["ALICEDEVICE"]
            event = {"type": "m.room.encrypted", "sender": BOT_USER, "content": content}
            decrypted = asyncio.run(peers.alice.decrypt_to_device_event(json.dumps(event)))
            expect("the recovery message, decrypted by Alice", decrypted.event_type, "m.dummy")
        posthog = sorted(
            ((e.get("event"), {k: e.get("properties", {}).get(k) for k in ("domain", "name", "cryptoSDK")}) for e in world.posthog),
            key=lambda event: str(event[1]["name"]),
        )
        expect(
            "PostHog events",
            posthog,
            [
                ("Error", {"domain": "TO_DEVICE", "name": "ToDeviceFailedToDecrypt_UnknownOneTimeKey", "cryptoSDK": "Rust"}),
                ("Error", {"domain": "TO_DEVICE", "name": "ToDeviceFailedToDecrypt_UnsupportedAlgorithm", "cryptoSDK": "Rust"}),
            ],
        )
        expect("requests to unknown endpoints", world.unknown, [])

        # A restart on the same store: it resumes from the committed token and uploads nothing.
        second = run_bot(bot, workdir, base)
        expect("restart: exit status", second.returncode, 0)
        expect("restart: stderr", second.stderr.strip(), "")
        expect("restart: output", second.stdout, "")
        expect("restart: syncs (since)", world.syncs[2:], ["s2"])
        expect("restart: uploads", len(world.uploads), 2)
        expect("restart: PostHog events", len(world.posthog), 2)
    server.shutdown()

    if problems:
        print("README example: FAILED", file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        if first.stderr.strip():
            print("first run's stderr:\n" + first.stderr, file=sys.stderr)
        sys.exit(1)
    print("README example: ok (2 runs; keys uploaded, batch decrypted, session recovered, 2 PostHog events)")


if __name__ == "__main__":
    main()
