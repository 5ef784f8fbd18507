"""Tests of the Python package (plain unittest): the generated bindings and the hand-written
package around them.

Run by scripts/test-bindings.sh, which assembles the package (to_device_crypto/__init__.py, the
generated _ffi.py and libto_device_crypto.so) next to this file in a temporary directory. Each case
matches the Kotlin and Swift suites; the exit test has no counterpart there (it is about CPython's
finalization).
"""

import asyncio
import json
import os
import queue
import subprocess
import sys
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
    OutgoingRequestFfi,
    ToDeviceResult,
    all_failure_reasons,
    failure_reason_from_name,
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

    def test_j_taxonomy_without_a_machine(self):
        reason = failure_reason_from_name("SessionWedged")
        self.assertEqual(reason, FailureReasonFfi.SESSION_WEDGED)
        self.assertEqual(failure_reason_from_name("ToDeviceFailedToDecrypt_SessionWedged"), reason)
        self.assertIsNone(failure_reason_from_name("DecryptionFailure"))
        self.assertEqual(reason.analytics_name(), "ToDeviceFailedToDecrypt_SessionWedged")
        event = reason.posthog_event()
        self.assertEqual(event.event, "Error")
        self.assertEqual(event.properties, {"domain": "TO_DEVICE", "name": "ToDeviceFailedToDecrypt_SessionWedged", "cryptoSDK": "Rust"})
        info = reason.info()
        self.assertEqual((info.reason, info.name, info.analytics_name), (reason, "SessionWedged", "ToDeviceFailedToDecrypt_SessionWedged"))
        self.assertIn("none of them decrypts", info.description)
        self.assertIn("ratchets diverged", info.typical_root_cause)
        self.assertTrue(info.needs_new_session)
        self.assertFalse(FailureReasonFfi.MALFORMED_EVENT.info().needs_new_session)
        reasons = all_failure_reasons()
        self.assertEqual(len(reasons), 17)
        self.assertEqual(len({r.info().analytics_name for r in reasons}), 17)

    def test_k_first_keys_upload_needs_no_call(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            upload = json.loads(await bob.keys_for_upload())
            self.assertEqual(len(upload["one_time_keys"]), 25)
            self.assertEqual(len(upload["fallback_keys"]), 1)
            self.assertEqual(upload["device_keys"]["device_id"], "BOBDEVICE")
            await bob.mark_keys_as_published()
            self.assertIsNone(await bob.keys_for_upload())
            self.assertEqual(await bob.receive_one_time_key_count(20, True), 5)

        run(body())

    def test_l_outgoing_requests_recover_a_session(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            carol = await OlmMachine.open_in_memory("@carol:example.org", "CAROLDEVICE")
            alice = await OlmMachine.open_in_memory("@alice:example.org", "ALICEDEVICE")
            # Bob's keys as a server that hands out the same one-time key twice would serve them.
            bob_upload = json.loads(await bob.keys_for_upload())
            await bob.mark_keys_as_published()
            one_key = dict(list(bob_upload["one_time_keys"].items())[:1])
            served = json.dumps({"device_keys": bob_upload["device_keys"], "one_time_keys": one_key})
            first = json.loads(await carol.encrypt_for(served, "m.dummy", "{}"))[0]
            await bob.decrypt_to_device_event(json.dumps(first))
            # Bob knows Alice's device, whose message was built on the key Carol used.
            alice_upload = json.loads(await alice.keys_for_upload())
            query = {"device_keys": {"@alice:example.org": {"ALICEDEVICE": alice_upload["device_keys"]}}}
            learned = await bob.receive_keys_query(json.dumps(query))
            self.assertEqual((learned.stored, learned.rejected, learned.refused_key_changes), (1, [], []))
            # Another account under Alice's device id: refused, reported with both keys, Alice's kept.
            impostor = await OlmMachine.open_in_memory("@alice:example.org", "ALICEDEVICE")
            impostor_upload = json.loads(await impostor.keys_for_upload())
            forged = {"device_keys": {"@alice:example.org": {"ALICEDEVICE": impostor_upload["device_keys"]}}}
            refused = await bob.receive_keys_query(json.dumps(forged))
            self.assertEqual(refused.stored, 0)
            [change] = refused.refused_key_changes
            self.assertEqual(
                (change.user_id, change.device_id, change.known_ed25519, change.received_ed25519),
                ("@alice:example.org", "ALICEDEVICE",
                 alice_upload["device_keys"]["keys"]["ed25519:ALICEDEVICE"],
                 impostor_upload["device_keys"]["keys"]["ed25519:ALICEDEVICE"]))
            second = json.loads(await alice.encrypt_for(served, "m.dummy", "{}"))[0]
            with self.assertRaises(DecryptionFailure.Failed) as failure:
                await bob.decrypt_to_device_event(json.dumps(second))
            self.assertEqual(failure.exception.reason, FailureReasonFfi.UNKNOWN_ONE_TIME_KEY)
            # Recovery: claim one of Alice's keys, then send her an Olm-encrypted m.dummy.
            [claim] = await bob.outgoing_requests()
            self.assertIsInstance(claim, OutgoingRequestFfi.KEYS_CLAIM)
            self.assertEqual(json.loads(claim.body_json), {"one_time_keys": {"@alice:example.org": {"ALICEDEVICE": "signed_curve25519"}}})
            alice_key = dict(list(alice_upload["one_time_keys"].items())[:1])
            await bob.mark_request_as_sent(claim.request_id, json.dumps({"one_time_keys": {"@alice:example.org": {"ALICEDEVICE": alice_key}}}))
            [dummy] = await bob.outgoing_requests()
            self.assertIsInstance(dummy, OutgoingRequestFfi.TO_DEVICE)
            self.assertEqual(dummy.event_type, "m.room.encrypted")
            content = json.loads(dummy.body_json)["messages"]["@alice:example.org"]["ALICEDEVICE"]
            event = {"type": dummy.event_type, "sender": "@bob:example.org", "content": content}
            self.assertEqual((await alice.decrypt_to_device_event(json.dumps(event))).event_type, "m.dummy")
            await bob.mark_request_as_sent(dummy.request_id, None)
            self.assertEqual(await bob.outgoing_requests(), [])
            with self.assertRaises(CryptoError):
                await bob.mark_request_as_sent(dummy.request_id, None)

        run(body())

    def test_m_flush_waits_for_the_listener(self):
        async def body():
            bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
            listener = Collecting()
            handle = bob.add_decryption_failure_listener(listener)
            for n in range(3):
                with self.assertRaises(DecryptionFailure):
                    await bob.decrypt_to_device_event(bad_event(n))
            self.assertTrue(await handle.flush(5000))
            self.assertEqual(listener.events.qsize(), 3, "flush returned before delivery")
            handle.cancel()
            self.assertFalse(await handle.flush(1000))

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


# --- the exit test: a script that returns from asyncio.run with a listener and a log sink -----------
EXIT_RUNS = 50
EXIT_PARALLEL = 10


KEPT = []


def exit_child(keep_handle):
    """What `python test_bindings.py exit-child keep|drop` runs: the script of issue 20 that aborted
    at exit ("FATAL: exception not rethrown", exit code 134) in about 1 run out of 4. It prints what
    the listener and the log sink receive, and returns from asyncio.run without waiting for them.
    With `keep`, the listener's handle outlives main(), so the package's atexit hook must deliver
    the failure; with `drop`, the handle is dropped (cancelled) as main() returns, racing the
    delivery thread."""

    lock = threading.Lock()  # the two threads' lines must not interleave

    def say(line):
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    class PrintingListener(DecryptionFailureListener):
        def on_decryption_failure(self, event):
            say("listener: " + event.analytics_name)

    class PrintingSink(LogSink):
        def log(self, level, target, message):
            say("log: " + message)

    async def main():
        set_log_sink(PrintingSink(), LogLevel.DEBUG)
        bob = await OlmMachine.open_in_memory("@bob:example.org", "BOBDEVICE")
        handle = bob.add_decryption_failure_listener(PrintingListener())
        if keep_handle:
            KEPT.append(handle)
        try:
            await bob.decrypt_to_device_event(BAD_EVENT)
        except DecryptionFailure:
            pass

    asyncio.run(main())


class ExitTest(unittest.TestCase):
    def test_z_exit_is_clean_with_a_listener_and_a_log_sink(self):
        """50 runs of exit_child (half keep the handle, half drop it), 10 at a time: every one exits
        with 0 and says nothing on stderr; its log sink received the failure's line and, when the
        handle was kept, its listener the failure (both delivered by the atexit flush)."""
        me = os.path.abspath(__file__)
        outcomes = []
        for start in range(0, EXIT_RUNS, EXIT_PARALLEL):
            batch = range(start, min(start + EXIT_PARALLEL, EXIT_RUNS))
            children = [
                (
                    n % 2 == 0,
                    subprocess.Popen(
                        [sys.executable, me, "exit-child", "keep" if n % 2 == 0 else "drop"],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
                for n in batch
            ]
            for kept, child in children:
                out, err = child.communicate(timeout=60)
                outcomes.append((kept, child.returncode, out, err))

        def clean(kept, rc, out, err):
            lines = out.splitlines()
            delivered = lines.count("listener: ToDeviceFailedToDecrypt_UnsupportedAlgorithm")
            logged = any(line.startswith("log: ") and "UnsupportedAlgorithm" in line for line in lines)
            return rc == 0 and not err.strip() and logged and (delivered == 1 if kept else delivered <= 1)

        bad = [(kept, rc, err.strip().splitlines()[-1:], out.splitlines()) for kept, rc, out, err in outcomes if not clean(kept, rc, out, err)]
        print("python: exit test: %d of %d runs clean" % (len(outcomes) - len(bad), len(outcomes)), file=sys.stderr)
        self.assertEqual(bad, [], "%d of %d runs were not clean" % (len(bad), len(outcomes)))


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
    if sys.argv[1:2] == ["exit-child"]:
        exit_child(keep_handle=sys.argv[2:] == ["keep"])
        sys.exit(0)
    result = unittest.main(exit=False, verbosity=1).result
    print("python: %d tests, %d failed" % (result.testsRun, len(result.failures) + len(result.errors)))
    measure_overhead()
    sys.exit(0 if result.wasSuccessful() else 1)
