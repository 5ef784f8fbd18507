"""Tests of the generated Python bindings (plain unittest).

Run by scripts/test-bindings.sh, which copies this file, the generated to_device_crypto.py and
libto_device_crypto.so into one temporary directory. Each case matches the Kotlin and Swift suites.
"""

import asyncio
import json
import os
import queue
import tempfile
import threading
import time
import unittest

from to_device_crypto import (
    CryptoError,
    ReportingPolicyFfi,
    CryptoSdkFfi,
    DecryptionFailure,
    DecryptionFailureListener,
    ErrorDomainFfi,
    FailureReasonFfi,
    LogLevel,
    LogSink,
    OlmMachine,
    ToDeviceResult,
    set_log_sink,
)

BAD_EVENT = '{"type":"m.room.encrypted","sender":"@a:b","content":{"algorithm":"m.megolm.v1.aes-sha2"}}'


def bad_event(n):
    """A distinct failing event per n: the reporting policy reports each distinct message once."""
    return BAD_EVENT.replace('"@a:b"', '"@a%d:b"' % n)
EXPECTED_JSON = (
    '{"event":"Error","properties":{"domain":"TO_DEVICE",'
    '"name":"ToDeviceFailedToDecrypt_UnsupportedAlgorithm","cryptoSDK":"Rust"}}'
)
EXPECTED_PROPERTIES = {
    "domain": "TO_DEVICE",
    "name": "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
    "cryptoSDK": "Rust",
}
TIMEOUT = 5.0


def run(coro):
    return asyncio.run(coro)


async def alice_and_bob():
    alice = await OlmMachine.open_in_memory("@alice:example.org", "ALICEDEVICE")
    bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
    await bob.generate_one_time_keys(5)
    return alice, bob


async def encrypted_for(alice, bob, content):
    events = json.loads(await alice.encrypt_for(await bob.keys_for_upload(), "m.dummy", json.dumps(content)))
    return json.dumps(events[0])


class Collecting(DecryptionFailureListener):
    def __init__(self):
        self.events = queue.Queue()
        self.threads = set()

    def on_decryption_failure(self, event):
        self.threads.add(threading.get_ident())
        self.events.put(event)


class Throwing(DecryptionFailureListener):
    def __init__(self):
        self.calls = 0

    def on_decryption_failure(self, event):
        self.calls += 1
        raise RuntimeError("listener bug")


class ThrowingOnce(DecryptionFailureListener):
    def __init__(self):
        self.calls = 0
        self.events = queue.Queue()

    def on_decryption_failure(self, event):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the analytics client is not ready yet")
        self.events.put(event)


async def eventually(condition):
    """Awaits `condition()` (a coroutine function) until it returns True, or TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def pending_payloads(machine):
    return json.loads(await machine.reporting_stats_json())["outbox"]["pending"]


# --- a stand-in for the PostHog SDK, and the forwarding snippet an app would write -----------------
class PostHog:
    def __init__(self):
        self.captured = []

    def capture(self, event, properties):
        self.captured.append((event, properties))


class PostHogForwarder(DecryptionFailureListener):
    def __init__(self, posthog):
        self.posthog = posthog

    def on_decryption_failure(self, event):
        self.posthog.capture(event.event, event.properties)


# --- the app's logger: what an app would forward to `logging` / its bug-report log ------------------
class CollectingLogSink(LogSink):
    def __init__(self):
        self.lines = queue.Queue()

    def log(self, level, target, message):
        self.lines.put((level, target, message))


def wait_until(predicate):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class BindingsTest(unittest.TestCase):
    def test_a_decrypts_a_real_event(self):
        async def body():
            alice, bob = await alice_and_bob()
            event = await bob.decrypt_to_device_event(await encrypted_for(alice, bob, {"hello": "world"}))
            self.assertEqual(event.event_type, "m.dummy")
            self.assertEqual(json.loads(event.content_json), {"hello": "world"})
            self.assertEqual(event.sender, "@alice:example.org")
            self.assertEqual(event.sender_curve25519_key, alice.identity_keys().curve25519)
            self.assertEqual(event.sender_ed25519_key, alice.identity_keys().ed25519)

        run(body())

    def test_b_typed_error_for_a_bad_event(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            with self.assertRaises(DecryptionFailure.Failed) as caught:
                await bob.decrypt_to_device_event(BAD_EVENT)
            self.assertEqual(caught.exception.reason, FailureReasonFfi.UNSUPPORTED_ALGORITHM)
            self.assertIn("m.megolm.v1.aes-sha2", caught.exception.message)

        run(body())

    def test_c_listener_receives_exactly_the_posthog_event(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            listener = Collecting()
            handle = bob.add_decryption_failure_listener(listener)
            with self.assertRaises(DecryptionFailure):
                await bob.decrypt_to_device_event(BAD_EVENT)
            event = listener.events.get(timeout=TIMEOUT)
            self.assertEqual(event.json, EXPECTED_JSON)
            self.assertEqual(event.properties, EXPECTED_PROPERTIES)
            self.assertEqual(event.event, "Error")
            self.assertEqual(event.domain, ErrorDomainFfi.TO_DEVICE)
            self.assertEqual(event.name, FailureReasonFfi.UNSUPPORTED_ALGORITHM)
            self.assertEqual(event.crypto_sdk, CryptoSdkFfi.RUST)
            self.assertEqual(event.analytics_name, "ToDeviceFailedToDecrypt_UnsupportedAlgorithm")
            self.assertNotIn(threading.get_ident(), listener.threads, "called on the decrypting thread")
            self.assertTrue(listener.events.empty())
            # Cancelling stops delivery.
            handle.cancel()
            with self.assertRaises(DecryptionFailure):
                await bob.decrypt_to_device_event(BAD_EVENT)
            time.sleep(0.2)
            self.assertTrue(listener.events.empty())

        run(body())

    def test_d_a_throwing_listener_disturbs_nothing(self):
        async def body():
            alice, bob = await alice_and_bob()
            throwing, good = Throwing(), Collecting()
            handles = [bob.add_decryption_failure_listener(throwing), bob.add_decryption_failure_listener(good)]
            for n in range(3):
                with self.assertRaises(DecryptionFailure):
                    await bob.decrypt_to_device_event(bad_event(n))
            self.assertTrue(wait_until(lambda: throwing.calls == 3 and good.events.qsize() == 3))
            event = await bob.decrypt_to_device_event(await encrypted_for(alice, bob, {"still": "works"}))
            self.assertEqual(json.loads(event.content_json), {"still": "works"})
            del handles

        run(body())

    def test_e_pull_subscription_receives_the_event(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            subscription = bob.failure_subscription()
            with self.assertRaises(DecryptionFailure):
                await bob.decrypt_to_device_event(BAD_EVENT)
            event = await asyncio.wait_for(subscription.next(), TIMEOUT)
            self.assertEqual(event.json, EXPECTED_JSON)
            self.assertEqual(subscription.missed(), 0)

        run(body())

    def test_g_reporting_policy_and_consent(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            good = Collecting()
            handle = bob.add_decryption_failure_listener(good)
            # The same message twice, and the same sender and name again: one PostHog event.
            for event in [bad_event(1), bad_event(1)]:
                with self.assertRaises(DecryptionFailure):
                    await bob.decrypt_to_device_event(event)
            await bob.set_analytics_enabled(False)
            with self.assertRaises(DecryptionFailure):
                await bob.decrypt_to_device_event(bad_event(2))
            await bob.set_analytics_enabled(True)
            await bob.set_reporting_policy(ReportingPolicyFfi(analytics_enabled=True, suppression_window_secs=0, max_events_per_minute=None))
            with self.assertRaises(DecryptionFailure):
                await bob.decrypt_to_device_event(bad_event(3))
            self.assertTrue(wait_until(lambda: good.events.qsize() == 2))
            stats = json.loads(await bob.reporting_stats_json())
            counts = stats["total"]["failures"]["UnsupportedAlgorithm"]
            self.assertEqual((counts["seen"], counts["reported"], counts["suppressed_already_seen"], counts["suppressed_disabled"]), (4, 2, 1, 1))
            # Nothing to recover: no outgoing request, and an unknown id is a typed error.
            self.assertEqual(await bob.outgoing_requests(), [])
            with self.assertRaises(CryptoError):
                await bob.mark_request_as_sent("unknown", None)
            del handle

        run(body())

    def test_h_outbox_and_sync_token(self):
        async def body():
            alice, bob = await alice_and_bob()
            event = await encrypted_for(alice, bob, {"n": 1})
            results = await bob.receive_sync("[%s]" % event, "s42_1")
            self.assertEqual(await bob.sync_token(), "s42_1")
            decrypted = results[0].event
            self.assertFalse(decrypted.re_emitted)
            # Not acknowledged yet: listed, and a re-delivery is a marked re-emission.
            pending = await bob.pending_decrypted_events()
            self.assertEqual([(p.batch, p.index, p.event.id) for p in pending], [(1, 0, decrypted.id)])
            again = await bob.decrypt_to_device_event(event)
            self.assertTrue(again.re_emitted)
            await bob.acknowledge([decrypted.id])
            self.assertEqual(await bob.pending_decrypted_events(), [])
            with self.assertRaises(DecryptionFailure) as failure:
                await bob.decrypt_to_device_event(event)
            self.assertEqual(failure.exception.reason, FailureReasonFfi.REPLAYED_MESSAGE)

        run(body())

    def test_j_analytics_outbox_and_flush(self):
        async def body():
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "store.sqlite3")
                bob = await OlmMachine.open_sqlite("@bob:example.org", "BOBDEVICE", path, bytes(32))
                # No listener yet: the payload waits in the store, nothing is claimed.
                with self.assertRaises(DecryptionFailure):
                    await bob.decrypt_to_device_event(BAD_EVENT)
                self.assertEqual(await bob.flush_pending_analytics(), 0)
                self.assertEqual(await pending_payloads(bob), 1)
                # A listener that throws once: added, it gets the waiting payload at once; the
                # throw leaves the payload for the next delivery, which flush makes now.
                flaky = ThrowingOnce()
                handle = bob.add_decryption_failure_listener(flaky)
                self.assertTrue(wait_until(lambda: flaky.calls == 1))
                async def flushed_one():
                    return await bob.flush_pending_analytics() == 1

                self.assertTrue(await eventually(flushed_one))
                event = flaky.events.get(timeout=TIMEOUT)
                self.assertEqual(event.json, EXPECTED_JSON)
                # Delivered: removed from the store, never delivered again.
                async def none_pending():
                    return await pending_payloads(bob) == 0

                self.assertTrue(await eventually(none_pending))
                self.assertEqual(await bob.flush_pending_analytics(), 0)
                self.assertTrue(flaky.events.empty())
                handle.cancel()

        run(body())

    def test_i_passphrase_store(self):
        async def body():
            with tempfile.TemporaryDirectory() as directory:
                path = os.path.join(directory, "store.sqlite3")
                bob = await OlmMachine.open_sqlite_with_passphrase("@bob:example.org", "BOBDEVICE", path, "correct horse")
                curve = bob.identity_keys().curve25519
                del bob
                again = await OlmMachine.open_sqlite_with_passphrase("@bob:example.org", "BOBDEVICE", path, "correct horse")
                self.assertEqual(again.identity_keys().curve25519, curve)
                del again
                with self.assertRaises(CryptoError):
                    await OlmMachine.open_sqlite_with_passphrase("@bob:example.org", "BOBDEVICE", path, "wrong")

        run(body())

    def test_f_forwarding_to_posthog(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            posthog = PostHog()
            handle = bob.add_decryption_failure_listener(PostHogForwarder(posthog))
            with self.assertRaises(DecryptionFailure):
                await bob.decrypt_to_device_event(BAD_EVENT)
            self.assertTrue(wait_until(lambda: len(posthog.captured) == 1))
            self.assertEqual(posthog.captured, [("Error", EXPECTED_PROPERTIES)])
            handle.cancel()

        run(body())

    def test_g_logs_reach_the_app_logger_redacted(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            sink = CollectingLogSink()
            set_log_sink(sink, LogLevel.DEBUG)
            try:
                with self.assertRaises(DecryptionFailure):
                    await bob.decrypt_to_device_event(BAD_EVENT)
                deadline = time.monotonic() + TIMEOUT
                line = None
                while line is None and time.monotonic() < deadline:
                    level, target, message = sink.lines.get(timeout=TIMEOUT)
                    if "UnsupportedAlgorithm" in message:
                        line = (level, target, message)
                self.assertIsNotNone(line, "no log line about the failure")
                level, target, message = line
                self.assertEqual(level, LogLevel.DEBUG)
                self.assertTrue(target.startswith("to_device_crypto"), target)
                self.assertIn("failed to decrypt", message)
                keys = bob.identity_keys()
                for secret in ("bob", "BOBDEVICE", keys.curve25519, keys.ed25519):
                    self.assertNotIn(secret, message)
            finally:
                set_log_sink(None, LogLevel.TRACE)

        run(body())

    def test_sync_batch_and_sqlite_store(self):
        async def body():
            with self.assertRaises(CryptoError.InvalidStoreKey):
                await OlmMachine.open_sqlite("@bob:example.org", "BOBDEVICE", "/nonexistent/x.db", b"short")
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "crypto.sqlite")
                alice = await OlmMachine.open_in_memory("@alice:example.org", "ALICEDEVICE")
                bob = await OlmMachine.open_sqlite("@bob:example.org", "BOBDEVICE", path, bytes(range(32)))
                self.assertEqual(await bob.generate_one_time_keys(2), 2)
                encrypted = await encrypted_for(alice, bob, {"n": 1})
                plain = '{"type":"m.dummy","sender":"@a:b","content":{}}'
                results = await bob.receive_to_device_events("[%s,%s,%s]" % (encrypted, plain, BAD_EVENT))
                self.assertIsInstance(results[0], ToDeviceResult.DECRYPTED)
                self.assertIsInstance(results[1], ToDeviceResult.PLAINTEXT)
                self.assertIsInstance(results[2], ToDeviceResult.FAILED)
                self.assertEqual(results[2].reason, FailureReasonFfi.UNSUPPORTED_ALGORITHM)

        run(body())


def measure_overhead(n=200, rounds=5):
    """Median of `rounds` rounds of `n` calls after 50 warm-up calls (the protocol of the Rust
    baseline in benches/ratios.rs, row 7)."""

    async def body():
        bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
        for _ in range(50):  # warm-up
            try:
                await bob.decrypt_to_device_event(BAD_EVENT)
            except DecryptionFailure:
                pass
        per_call = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(n):
                try:
                    await bob.decrypt_to_device_event(BAD_EVENT)
                except DecryptionFailure:
                    pass
            per_call.append((time.perf_counter() - start) / n * 1e6)
        return sorted(per_call)[rounds // 2]

    print(
        "python: decrypt_to_device_event overhead: %.1f us/event (median of %d rounds of %d failing events)"
        % (run(body()), rounds, n)
    )


if __name__ == "__main__":
    import sys

    result = unittest.main(exit=False, verbosity=1).result
    print("python: %d tests, %d failed" % (result.testsRun, len(result.failures) + len(result.errors)))
    measure_overhead()
    sys.exit(0 if result.wasSuccessful() else 1)
