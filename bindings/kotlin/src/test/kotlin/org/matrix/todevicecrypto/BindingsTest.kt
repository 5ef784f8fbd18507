// Tests of the generated Kotlin bindings on the JVM (run by scripts/test-bindings.sh with kotlinc,
// JNA and kotlinx-coroutines; no JUnit). Each case matches the Python and Swift suites.
package org.matrix.todevicecrypto

import java.util.concurrent.CopyOnWriteArrayList
import java.util.concurrent.LinkedBlockingQueue
import java.util.concurrent.TimeUnit
import java.util.concurrent.atomic.AtomicInteger
import kotlinx.coroutines.flow.first
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
// PostHog is a stand-in (com/posthog/PostHog.kt); the readme package is the README's Kotlin
// snippet, extracted by scripts/test-bindings.sh.
import com.posthog.PostHog
import org.matrix.todevicecrypto.readme.KeysUploader
import org.matrix.todevicecrypto.readme.PostHogForwarder
import org.matrix.todevicecrypto.readme.decryptOne
import org.matrix.todevicecrypto.readme.receive
import org.matrix.todevicecrypto.readme.startCrypto

const val BAD_EVENT =
    """{"type":"m.room.encrypted","sender":"@a:b","content":{"algorithm":"m.megolm.v1.aes-sha2"}}"""
const val EXPECTED_JSON =
    """{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_UnsupportedAlgorithm","cryptoSDK":"Rust"}}"""
val EXPECTED_PROPERTIES = mapOf(
    "domain" to "TO_DEVICE",
    "name" to "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
    "cryptoSDK" to "Rust",
)

fun check(condition: Boolean, message: () -> String) {
    if (!condition) throw AssertionError(message())
}

fun <T> checkEquals(expected: T, actual: T) = check(expected == actual) { "expected <$expected>, got <$actual>" }

/** A distinct failing event per n: the reporting policy reports each distinct message once. */
fun badEvent(n: Int): String = BAD_EVENT.replace("\"@a:b\"", "\"@a$n:b\"")

suspend fun expectFailure(machine: OlmMachine, json: String = BAD_EVENT): DecryptionFailure.Failed =
    try {
        machine.decryptToDeviceEvent(json)
        throw AssertionError("decryption unexpectedly succeeded")
    } catch (e: DecryptionFailure.Failed) {
        e
    }

fun waitUntil(condition: () -> Boolean) {
    val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5)
    while (!condition()) {
        check(System.nanoTime() < deadline) { "timed out" }
        Thread.sleep(10)
    }
}

suspend fun bob() = OlmMachine.openInMemory("@bob:example.org", "BOBDEVICE")

/** Encrypts a `m.dummy` event from a new Alice for `bob`; returns Alice and the event JSON. */
suspend fun encryptedFor(bob: OlmMachine, content: String): Pair<OlmMachine, String> {
    val alice = OlmMachine.openInMemory("@alice:example.org", "ALICEDEVICE")
    bob.generateOneTimeKeys(5u)
    val array = alice.encryptFor(bob.keysForUpload()!!, "m.dummy", content)
    // The array holds exactly one event: strip the brackets.
    return alice to array.removePrefix("[").removeSuffix("]")
}

class Collecting : DecryptionFailureListener {
    val events = LinkedBlockingQueue<PosthogErrorEvent>()
    val threads = CopyOnWriteArrayList<Thread>()
    override fun onDecryptionFailure(event: PosthogErrorEvent) {
        threads.add(Thread.currentThread())
        events.add(event)
    }
}

class Throwing : DecryptionFailureListener {
    val calls = AtomicInteger()
    override fun onDecryptionFailure(event: PosthogErrorEvent) {
        calls.incrementAndGet()
        throw IllegalStateException("listener bug")
    }
}

/** The homeserver side of the README's `startCrypto`: records the `/keys/upload` bodies. */
class RecordingUploader : KeysUploader {
    val bodies = CopyOnWriteArrayList<String>()
    override suspend fun uploadKeys(body: String) {
        bodies.add(body)
    }
}

// The app's logger: what an app would forward to Timber / android.util.Log and its bug reports.
class CollectingLogSink : LogSink {
    val lines = LinkedBlockingQueue<Triple<LogLevel, String, String>>()
    override fun log(level: LogLevel, target: String, message: String) {
        lines.add(Triple(level, target, message))
    }
}

val tests: List<Pair<String, suspend () -> Unit>> = listOf(
    "a decrypts a real event" to {
        val bob = bob()
        val (alice, json) = encryptedFor(bob, """{"hello":"world"}""")
        val event = bob.decryptToDeviceEvent(json)
        checkEquals("m.dummy", event.eventType)
        checkEquals("""{"hello":"world"}""", event.contentJson)
        checkEquals("@alice:example.org", event.sender)
        checkEquals(alice.identityKeys().curve25519, event.senderCurve25519Key)
        checkEquals(alice.identityKeys().ed25519, event.senderEd25519Key)
    },
    "b typed error for a bad event" to {
        val failure = expectFailure(bob())
        checkEquals(FailureReasonFfi.UNSUPPORTED_ALGORITHM, failure.reason)
        check("m.megolm.v1.aes-sha2" in failure.errorMessage) { failure.errorMessage }
    },
    "c listener receives exactly the PostHog event" to {
        val bob = bob()
        val listener = Collecting()
        val handle = bob.addDecryptionFailureListener(listener)
        expectFailure(bob)
        val event = listener.events.poll(5, TimeUnit.SECONDS) ?: throw AssertionError("no event")
        checkEquals(EXPECTED_JSON, event.json)
        checkEquals(EXPECTED_PROPERTIES, event.properties)
        checkEquals("Error", event.event)
        checkEquals(ErrorDomainFfi.TO_DEVICE, event.domain)
        checkEquals(FailureReasonFfi.UNSUPPORTED_ALGORITHM, event.name)
        checkEquals(CryptoSdkFfi.RUST, event.cryptoSdk)
        checkEquals("ToDeviceFailedToDecrypt_UnsupportedAlgorithm", event.analyticsName)
        check(Thread.currentThread() !in listener.threads) { "called on the decrypting thread" }
        handle.cancel()
        expectFailure(bob)
        Thread.sleep(200)
        check(listener.events.isEmpty()) { "delivered after cancel" }
    },
    "d a throwing listener disturbs nothing" to {
        val bob = bob()
        val throwing = Throwing()
        val good = Collecting()
        val handles = listOf(bob.addDecryptionFailureListener(throwing), bob.addDecryptionFailureListener(good))
        repeat(3) { expectFailure(bob, badEvent(it)) }
        waitUntil { throwing.calls.get() == 3 && good.events.size == 3 }
        val (_, json) = encryptedFor(bob, """{"still":"works"}""")
        checkEquals("""{"still":"works"}""", bob.decryptToDeviceEvent(json).contentJson)
        handles.forEach { it.close() }
    },
    "e Flow helper receives the event" to {
        val bob = bob()
        val flow = bob.failureSubscription().asFlow()
        expectFailure(bob)
        val event = withTimeout(5_000) { flow.first() }
        checkEquals(EXPECTED_JSON, event.json)
    },
    "f forwarding to PostHog" to {
        val bob = bob()
        val before = PostHog.captured.size
        val handle = bob.addDecryptionFailureListener(PostHogForwarder())
        expectFailure(bob)
        check(handle.flush(5_000u)) { "flush timed out" }
        checkEquals(listOf<Pair<String, Map<String, Any>>>("Error" to EXPECTED_PROPERTIES), PostHog.captured.drop(before))
        handle.close()
    },
    "g2 logs reach the app logger, redacted" to {
        val bob = bob()
        val sink = CollectingLogSink()
        setLogSink(sink, LogLevel.DEBUG)
        try {
            expectFailure(bob)
            var line: Triple<LogLevel, String, String>? = null
            val deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5)
            while (line == null && System.nanoTime() < deadline) {
                val next = sink.lines.poll(100, TimeUnit.MILLISECONDS) ?: continue
                if ("UnsupportedAlgorithm" in next.third) line = next
            }
            val (level, target, message) = line ?: throw AssertionError("no log line about the failure")
            checkEquals(LogLevel.DEBUG, level)
            check(target.startsWith("to_device_crypto")) { target }
            check("failed to decrypt" in message) { message }
            val keys = bob.identityKeys()
            for (secret in listOf("bob", "BOBDEVICE", keys.curve25519, keys.ed25519)) {
                check(secret !in message) { "'$secret' in log line: $message" }
            }
        } finally {
            setLogSink(null, LogLevel.TRACE)
        }
    },
    "g reporting policy and consent" to {
        val bob = bob()
        val good = Collecting()
        val handle = bob.addDecryptionFailureListener(good)
        // The same message twice, and the same sender and name again: one PostHog event.
        repeat(2) { expectFailure(bob, badEvent(1)) }
        bob.setAnalyticsEnabled(false)
        expectFailure(bob, badEvent(2))
        bob.setAnalyticsEnabled(true)
        bob.setReportingPolicy(ReportingPolicyFfi(analyticsEnabled = true, suppressionWindowSecs = 0uL, maxEventsPerMinute = null))
        expectFailure(bob, badEvent(3))
        check(handle.flush(5_000u)) { "flush timed out" }
        checkEquals(2, good.events.size)
        val counts = parseJson(bob.reportingStatsJson()).obj("total").obj("failures").obj("UnsupportedAlgorithm")
        checkEquals(listOf(4.0, 2.0, 1.0, 1.0), listOf("seen", "reported", "suppressed_already_seen", "suppressed_disabled").map { counts[it] })
        handle.close()
    },
    "h outbox and sync token" to {
        val bob = bob()
        val (_, event) = encryptedFor(bob, """{"n":1}""")
        val results = bob.receiveSync("[$event]", "s42_1")
        checkEquals("s42_1", bob.syncToken())
        val decrypted = (results[0] as ToDeviceResult.Decrypted).event
        check(!decrypted.reEmitted) { "first delivery marked as re-emitted" }
        // Not acknowledged yet: listed, and a re-delivery is a marked re-emission.
        checkEquals(listOf(Triple(1uL, 0uL, decrypted.id)), bob.pendingDecryptedEvents().map { Triple(it.batch, it.index, it.event.id) })
        check(bob.decryptToDeviceEvent(event).reEmitted) { "re-delivery not marked" }
        bob.acknowledge(listOf(decrypted.id))
        checkEquals(emptyList<PendingEvent>(), bob.pendingDecryptedEvents())
        checkEquals(FailureReasonFfi.REPLAYED_MESSAGE, expectFailure(bob, event).reason)
    },
    "i passphrase store" to {
        val dir = kotlin.io.path.createTempDirectory("tdc").toFile()
        try {
            val path = "$dir/store.sqlite3"
            val curve = OlmMachine.openSqliteWithPassphrase("@bob:example.org", "BOBDEVICE", path, "correct horse").use { it.identityKeys().curve25519 }
            OlmMachine.openSqliteWithPassphrase("@bob:example.org", "BOBDEVICE", path, "correct horse").use {
                checkEquals(curve, it.identityKeys().curve25519)
            }
            try {
                OlmMachine.openSqliteWithPassphrase("@bob:example.org", "BOBDEVICE", path, "wrong")
                throw AssertionError("a wrong passphrase opened the store")
            } catch (e: CryptoException.Store) {
                check("key" in e.detail) { e.detail }
            }
        } finally {
            dir.deleteRecursively()
        }
    },
    "j taxonomy without a machine" to {
        val reason = failureReasonFromName("SessionWedged") ?: throw AssertionError("unknown name")
        checkEquals(FailureReasonFfi.SESSION_WEDGED, reason)
        checkEquals(reason, failureReasonFromName("ToDeviceFailedToDecrypt_SessionWedged"))
        checkEquals(null, failureReasonFromName("DecryptionFailure"))
        checkEquals("ToDeviceFailedToDecrypt_SessionWedged", reason.analyticsName())
        val event = reason.posthogEvent()
        checkEquals("Error", event.event)
        checkEquals(mapOf("domain" to "TO_DEVICE", "name" to "ToDeviceFailedToDecrypt_SessionWedged", "cryptoSDK" to "Rust"), event.properties)
        val info = reason.info()
        checkEquals(Triple(reason, "SessionWedged", "ToDeviceFailedToDecrypt_SessionWedged"), Triple(info.reason, info.name, info.analyticsName))
        check("none of them decrypts" in info.description) { info.description }
        check("ratchets diverged" in info.typicalRootCause) { info.typicalRootCause }
        check(info.needsNewSession) { "SessionWedged needs a new session" }
        check(!FailureReasonFfi.MALFORMED_EVENT.info().needsNewSession) { "MalformedEvent needs no session" }
        checkEquals(17, allFailureReasons().map { it.info().analyticsName }.toSet().size)
    },
    "k first keys upload needs no call" to {
        val bob = bob()
        val upload = parseJson(bob.keysForUpload()!!)
        checkEquals(25, upload.obj("one_time_keys").size)
        checkEquals(1, upload.obj("fallback_keys").size)
        checkEquals("BOBDEVICE", upload.obj("device_keys")["device_id"])
        bob.markKeysAsPublished()
        checkEquals(null, bob.keysForUpload())
        checkEquals(5u, bob.receiveOneTimeKeyCount(20uL, true))
    },
    "l outgoing requests recover a session" to {
        val bob = bob()
        val carol = OlmMachine.openInMemory("@carol:example.org", "CAROLDEVICE")
        val alice = OlmMachine.openInMemory("@alice:example.org", "ALICEDEVICE")
        // Bob's keys as a server that hands out the same one-time key twice would serve them.
        val bobUpload = parseJson(bob.keysForUpload()!!)
        bob.markKeysAsPublished()
        val oneKey = bobUpload.obj("one_time_keys").entries.first().let { mapOf(it.key to it.value) }
        val served = toJson(mapOf("device_keys" to bobUpload.obj("device_keys"), "one_time_keys" to oneKey))
        bob.decryptToDeviceEvent(carol.encryptFor(served, "m.dummy", "{}").removePrefix("[").removeSuffix("]"))
        // Bob knows Alice's device, whose message was built on the key Carol used.
        val aliceUpload = parseJson(alice.keysForUpload()!!)
        val query = mapOf("device_keys" to mapOf("@alice:example.org" to mapOf("ALICEDEVICE" to aliceUpload.obj("device_keys"))))
        val learned = bob.receiveKeysQuery(toJson(query))
        checkEquals(Triple(1u, emptyList<String>(), emptyList<RefusedKeyChangeFfi>()), Triple(learned.stored, learned.rejected, learned.refusedKeyChanges))
        // Another account under Alice's device id: refused, reported with both keys, Alice's kept.
        val impostor = OlmMachine.openInMemory("@alice:example.org", "ALICEDEVICE")
        val impostorUpload = parseJson(impostor.keysForUpload()!!)
        val forged = mapOf("device_keys" to mapOf("@alice:example.org" to mapOf("ALICEDEVICE" to impostorUpload.obj("device_keys"))))
        val refused = bob.receiveKeysQuery(toJson(forged))
        checkEquals(0u, refused.stored)
        val change = refused.refusedKeyChanges.single()
        checkEquals(listOf("@alice:example.org", "ALICEDEVICE"), listOf(change.userId, change.deviceId))
        checkEquals(aliceUpload.obj("device_keys").obj("keys")["ed25519:ALICEDEVICE"], change.knownEd25519)
        checkEquals(impostorUpload.obj("device_keys").obj("keys")["ed25519:ALICEDEVICE"], change.receivedEd25519)
        val second = alice.encryptFor(served, "m.dummy", "{}").removePrefix("[").removeSuffix("]")
        checkEquals(FailureReasonFfi.UNKNOWN_ONE_TIME_KEY, expectFailure(bob, second).reason)
        // Recovery: claim one of Alice's keys, then send her an Olm-encrypted m.dummy.
        val claim = bob.outgoingRequests().single() as OutgoingRequestFfi.KeysClaim
        checkEquals(mapOf("one_time_keys" to mapOf("@alice:example.org" to mapOf("ALICEDEVICE" to "signed_curve25519"))), parseJson(claim.bodyJson))
        val aliceKey = aliceUpload.obj("one_time_keys").entries.first().let { mapOf(it.key to it.value) }
        bob.markRequestAsSent(claim.requestId, toJson(mapOf("one_time_keys" to mapOf("@alice:example.org" to mapOf("ALICEDEVICE" to aliceKey)))))
        val dummy = bob.outgoingRequests().single() as OutgoingRequestFfi.ToDevice
        checkEquals("m.room.encrypted", dummy.eventType)
        val content = parseJson(dummy.bodyJson).obj("messages").obj("@alice:example.org").obj("ALICEDEVICE")
        val event = toJson(mapOf("type" to dummy.eventType, "sender" to "@bob:example.org", "content" to content))
        checkEquals("m.dummy", alice.decryptToDeviceEvent(event).eventType)
        bob.markRequestAsSent(dummy.requestId, null)
        checkEquals(emptyList<OutgoingRequestFfi>(), bob.outgoingRequests())
        try {
            bob.markRequestAsSent(dummy.requestId, null)
            throw AssertionError("an unknown request id was accepted")
        } catch (e: CryptoException) {
        }
    },
    "m flush waits for the listener" to {
        val bob = bob()
        val listener = Collecting()
        val handle = bob.addDecryptionFailureListener(listener)
        repeat(3) { expectFailure(bob, badEvent(it)) }
        check(handle.flush(5_000u)) { "flush timed out" }
        checkEquals(3, listener.events.size)
        handle.cancel()
        check(!handle.flush(1_000u)) { "flush on a cancelled handle said true" }
    },
    "n README adopter path" to {
        // The README's Kotlin snippet, end to end: start, a batch with a decryptable, a plain and
        // a failing event, acknowledgement, the failure in PostHog, and decryptOne both ways.
        val dir = kotlin.io.path.createTempDirectory("tdc").toFile()
        try {
            val server = RecordingUploader()
            val (machine, forwarding) = startCrypto("@bob:example.org", "BOBDEVICE", "$dir/crypto.sqlite3", ByteArray(32) { 7 }, server)
            checkEquals(1, server.bodies.size)
            checkEquals(25, parseJson(server.bodies[0]).obj("one_time_keys").size)
            checkEquals(null, machine.keysForUpload())

            // Alice got the published keys from the server (/keys/query, /keys/claim).
            val alice = OlmMachine.openInMemory("@alice:example.org", "ALICEDEVICE")
            suspend fun fromAlice(content: String) =
                alice.encryptFor(server.bodies[0], "m.dummy", content).removePrefix("[").removeSuffix("]")
            val before = PostHog.captured.size
            val event = fromAlice("""{"n":1}""")
            val plain = """{"type":"m.dummy","sender":"@a:b","content":{}}"""
            val decrypted = receive("[$event,$plain,${badEvent(42)}]", "s7", machine)
            checkEquals(listOf("""{"n":1}"""), decrypted.map { it.contentJson })
            checkEquals("s7", machine.syncToken())
            checkEquals(emptyList<PendingEvent>(), machine.pendingDecryptedEvents())
            check(forwarding.flush(5_000u)) { "flush timed out" }
            checkEquals(listOf<Pair<String, Map<String, Any>>>("Error" to EXPECTED_PROPERTIES), PostHog.captured.drop(before))

            checkEquals(null, decryptOne(badEvent(43), machine))
            checkEquals("""{"n":2}""", decryptOne(fromAlice("""{"n":2}"""), machine)?.contentJson)
            forwarding.close()
            machine.close()
        } finally {
            dir.deleteRecursively()
        }
    },
    "sync batch and SQLite store" to {
        try {
            OlmMachine.openSqlite("@bob:example.org", "BOBDEVICE", "/nonexistent/x.db", ByteArray(5))
            throw AssertionError("a short key was accepted")
        } catch (e: CryptoException.InvalidStoreKey) {
            checkEquals(5uL, e.length)
        }
        val dir = kotlin.io.path.createTempDirectory("tdc").toFile()
        try {
            val bob = OlmMachine.openSqlite("@bob:example.org", "BOBDEVICE", "$dir/crypto.sqlite", ByteArray(32) { it.toByte() })
            val (_, json) = encryptedFor(bob, """{"n":1}""")
            val plain = """{"type":"m.dummy","sender":"@a:b","content":{}}"""
            val results = bob.receiveToDeviceEvents("[$json,$plain,$BAD_EVENT]")
            check(results[0] is ToDeviceResult.Decrypted) { "${results[0]}" }
            check(results[1] is ToDeviceResult.Plaintext) { "${results[1]}" }
            checkEquals(FailureReasonFfi.UNSUPPORTED_ALGORITHM, (results[2] as ToDeviceResult.Failed).reason)
        } finally {
            dir.deleteRecursively()
        }
    },
)

fun main() = runBlocking {
    var failed = 0
    for ((name, body) in tests) {
        try {
            body()
            println("kotlin: ok   $name")
        } catch (e: Throwable) {
            failed++
            println("kotlin: FAIL $name: $e")
        }
    }
    println("kotlin: ${tests.size} tests, $failed failed")

    // Median of 5 rounds of 200 calls after 50 warm-up calls: the protocol of the Rust baseline
    // (benches/ratios.rs, row 7).
    val bob = bob()
    val n = 200
    val rounds = 5
    repeat(50) { expectFailure(bob) } // warm-up (JIT)
    val perCall = List(rounds) {
        val start = System.nanoTime()
        repeat(n) { expectFailure(bob) }
        (System.nanoTime() - start) / 1_000.0 / n
    }
    val micros = perCall.sorted()[rounds / 2]
    println(
        "kotlin: decrypt_to_device_event overhead: %.1f us/event (median of %d rounds of %d failing events)"
            .format(micros, rounds, n),
    )
    if (failed > 0) kotlin.system.exitProcess(1)
}
