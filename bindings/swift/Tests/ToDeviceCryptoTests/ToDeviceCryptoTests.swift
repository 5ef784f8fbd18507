// Tests of the generated Swift bindings (XCTest; run by scripts/test-bindings.sh with
// `swift test --disable-swift-testing`). Each case matches the Python and Kotlin suites.
import Foundation
import XCTest

@testable import ToDeviceCrypto

let badEvent = #"{"type":"m.room.encrypted","sender":"@a:b","content":{"algorithm":"m.megolm.v1.aes-sha2"}}"#
let expectedJSON = #"{"event":"Error","properties":{"domain":"TO_DEVICE","name":"ToDeviceFailedToDecrypt_UnsupportedAlgorithm","cryptoSDK":"Rust"}}"#
let expectedProperties = [
    "domain": "TO_DEVICE",
    "name": "ToDeviceFailedToDecrypt_UnsupportedAlgorithm",
    "cryptoSDK": "Rust",
]

func makeBob() async throws -> OlmMachine {
    try await OlmMachine.openInMemory(userId: "@bob:example.org", deviceId: "BOBDEVICE")
}

/// Encrypts an `m.dummy` event from a new Alice for `bob`; returns Alice and the event JSON.
func encrypted(for bob: OlmMachine, content: String) async throws -> (OlmMachine, String) {
    let alice = try await OlmMachine.openInMemory(userId: "@alice:example.org", deviceId: "ALICEDEVICE")
    _ = try await bob.generateOneTimeKeys(count: 5)
    let keys = await bob.keysForUpload()
    let array = try await alice.encryptFor(recipientKeysUploadJson: keys!, eventType: "m.dummy", contentJson: content)
    return (alice, String(array.dropFirst().dropLast())) // exactly one event
}

struct UnexpectedSuccess: Error {}

/// A distinct failing event per n: the reporting policy reports each distinct message once.
func distinctBadEvent(_ n: Int) -> String {
    badEvent.replacingOccurrences(of: "\"@a:b\"", with: "\"@a\(n):b\"")
}

@discardableResult
func expectFailure(_ machine: OlmMachine, _ json: String = badEvent) async throws -> (FailureReasonFfi, String) {
    do {
        _ = try await machine.decryptToDeviceEvent(json: json)
    } catch let DecryptionFailure.Failed(reason, message) {
        return (reason, message)
    }
    throw UnexpectedSuccess()
}

/// Collects events from whatever thread the listener is called on.
final class Collecting: DecryptionFailureListener, @unchecked Sendable {
    private let lock = NSLock()
    private var _events: [PosthogErrorEvent] = []
    private var _onMainThreadOfTest = false
    let testThread: Thread
    init(testThread: Thread = .current) { self.testThread = testThread }
    var events: [PosthogErrorEvent] { lock.lock(); defer { lock.unlock() }; return _events }
    var calledOnTestThread: Bool { lock.lock(); defer { lock.unlock() }; return _onMainThreadOfTest }
    func onDecryptionFailure(event: PosthogErrorEvent) {
        lock.lock(); defer { lock.unlock() }
        _events.append(event)
        if Thread.current == testThread { _onMainThreadOfTest = true }
    }
}

/// Swift cannot throw from a non-throwing protocol method, so the misbehaving listener here is a
/// slow one: it must not hold up decryption, nor the other listener.
final class Slow: DecryptionFailureListener, @unchecked Sendable {
    private let lock = NSLock()
    private var _calls = 0
    var calls: Int { lock.lock(); defer { lock.unlock() }; return _calls }
    func onDecryptionFailure(event: PosthogErrorEvent) {
        Thread.sleep(forTimeInterval: 0.3)
        lock.lock(); _calls += 1; lock.unlock()
    }
}

// A stand-in for the PostHog iOS SDK (`PostHogSDK.shared.capture(_:properties:)`). The forwarding
// code an app writes, `PostHogForwarder`, is the README's snippet (ReadmeSnippet.swift, extracted
// by scripts/test-bindings.sh).
final class PostHogSDK: @unchecked Sendable {
    static let shared = PostHogSDK()
    private let lock = NSLock()
    private var _captured: [(String, [String: Any])] = []
    var captured: [(String, [String: Any])] { lock.lock(); defer { lock.unlock() }; return _captured }
    func capture(_ event: String, properties: [String: Any]? = nil) {
        lock.lock(); defer { lock.unlock() }
        _captured.append((event, properties ?? [:]))
    }
}

/// The homeserver side of the README's `startCrypto`: records the `/keys/upload` bodies.
final class RecordingUploader: KeysUploader, @unchecked Sendable {
    private let lock = NSLock()
    private var _bodies: [String] = []
    var bodies: [String] { lock.lock(); defer { lock.unlock() }; return _bodies }
    func uploadKeys(body: String) async throws {
        lock.lock(); defer { lock.unlock() }
        _bodies.append(body)
    }
}

/// The app's logger: what an app would forward to os_log / its bug-report log.
final class CollectingLogSink: LogSink, @unchecked Sendable {
    private let lock = NSLock()
    private var _lines: [(LogLevel, String, String)] = []
    var lines: [(LogLevel, String, String)] { lock.lock(); defer { lock.unlock() }; return _lines }
    func log(level: LogLevel, target: String, message: String) {
        lock.lock(); defer { lock.unlock() }
        _lines.append((level, target, message))
    }
}

/// JSON text to a dictionary, and back (the API passes JSON text).
func parseJSON(_ text: String) throws -> [String: Any] {
    guard let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any] else {
        throw UnexpectedSuccess()
    }
    return object
}

func jsonText(_ value: Any) throws -> String {
    String(decoding: try JSONSerialization.data(withJSONObject: value), as: UTF8.self)
}

/// The first entry of a JSON object, as an object of its own.
func firstEntry(_ object: Any?) -> [String: Any] {
    guard let object = object as? [String: Any], let first = object.first else { return [:] }
    return [first.key: first.value]
}

func waitUntil(_ condition: () -> Bool) -> Bool {
    let deadline = Date().addingTimeInterval(5)
    while !condition() {
        if Date() > deadline { return false }
        Thread.sleep(forTimeInterval: 0.01)
    }
    return true
}

final class ToDeviceCryptoTests: XCTestCase {
    func testA_decryptsARealEvent() async throws {
        let bob = try await makeBob()
        let (alice, json) = try await encrypted(for: bob, content: #"{"hello":"world"}"#)
        let event = try await bob.decryptToDeviceEvent(json: json)
        XCTAssertEqual(event.eventType, "m.dummy")
        XCTAssertEqual(event.contentJson, #"{"hello":"world"}"#)
        XCTAssertEqual(event.sender, "@alice:example.org")
        XCTAssertEqual(event.senderCurve25519Key, alice.identityKeys().curve25519)
        XCTAssertEqual(event.senderEd25519Key, alice.identityKeys().ed25519)
    }

    func testB_typedErrorForABadEvent() async throws {
        let (reason, message) = try await expectFailure(try await makeBob())
        XCTAssertEqual(reason, .unsupportedAlgorithm)
        XCTAssertTrue(message.contains("m.megolm.v1.aes-sha2"), message)
    }

    func testC_listenerReceivesExactlyThePosthogEvent() async throws {
        let bob = try await makeBob()
        let listener = Collecting()
        let handle = bob.addDecryptionFailureListener(listener: listener)
        try await expectFailure(bob)
        XCTAssertTrue(waitUntil { listener.events.count == 1 })
        let event = listener.events[0]
        XCTAssertEqual(event.json, expectedJSON)
        XCTAssertEqual(event.properties, expectedProperties)
        XCTAssertEqual(event.event, "Error")
        XCTAssertEqual(event.domain, .toDevice)
        XCTAssertEqual(event.name, .unsupportedAlgorithm)
        XCTAssertEqual(event.cryptoSdk, .rust)
        XCTAssertEqual(event.analyticsName, "ToDeviceFailedToDecrypt_UnsupportedAlgorithm")
        XCTAssertFalse(listener.calledOnTestThread)
        handle.cancel()
        try await expectFailure(bob)
        try await Task.sleep(nanoseconds: 200_000_000)
        XCTAssertEqual(listener.events.count, 1, "delivered after cancel")
    }

    func testD_aMisbehavingListenerDisturbsNothing() async throws {
        let bob = try await makeBob()
        let slow = Slow()
        let good = Collecting()
        let handles = [bob.addDecryptionFailureListener(listener: slow), bob.addDecryptionFailureListener(listener: good)]
        let start = Date()
        for n in 0..<3 { try await expectFailure(bob, distinctBadEvent(n)) }
        XCTAssertLessThan(Date().timeIntervalSince(start), 0.3, "a slow listener held up decryption")
        XCTAssertTrue(waitUntil { good.events.count == 3 && slow.calls == 3 })
        let (_, json) = try await encrypted(for: bob, content: #"{"still":"works"}"#)
        let event = try await bob.decryptToDeviceEvent(json: json)
        XCTAssertEqual(event.contentJson, #"{"still":"works"}"#)
        withExtendedLifetime(handles) {}
    }

    func testE_asyncStreamReceivesTheEvent() async throws {
        let bob = try await makeBob()
        let stream = bob.decryptionFailures()
        try await expectFailure(bob)
        var iterator = stream.makeAsyncIterator()
        let event = await iterator.next()
        XCTAssertEqual(event?.json, expectedJSON)
    }

    func testF_forwardingToPosthog() async throws {
        let bob = try await makeBob()
        let before = PostHogSDK.shared.captured.count
        let handle = bob.addDecryptionFailureListener(listener: PostHogForwarder())
        try await expectFailure(bob)
        let flushed = await handle.flush(timeoutMs: 5000)
        XCTAssertTrue(flushed)
        let captured = PostHogSDK.shared.captured.dropFirst(before)
        XCTAssertEqual(captured.map(\.0), ["Error"])
        XCTAssertEqual(captured.first?.1 as? [String: String], expectedProperties)
        handle.cancel()
    }

    func testG_logsReachTheAppLoggerRedacted() async throws {
        let bob = try await makeBob()
        let sink = CollectingLogSink()
        setLogSink(sink: sink, maxLevel: .debug)
        defer { setLogSink(sink: nil, maxLevel: .trace) }
        try await expectFailure(bob)
        let aboutFailure = { sink.lines.first { $0.2.contains("UnsupportedAlgorithm") } }
        XCTAssertTrue(waitUntil { aboutFailure() != nil }, "no log line about the failure")
        guard let line = aboutFailure() else { return }
        let (level, target, message) = line
        XCTAssertEqual(level, .debug)
        XCTAssertTrue(target.hasPrefix("to_device_crypto"), target)
        XCTAssertTrue(message.contains("failed to decrypt"), message)
        let keys = bob.identityKeys()
        for secret in ["bob", "BOBDEVICE", keys.curve25519, keys.ed25519] {
            XCTAssertFalse(message.contains(secret), "'\(secret)' in log line: \(message)")
        }
    }

    func testG2_reportingPolicyAndConsent() async throws {
        let bob = try await makeBob()
        let good = Collecting()
        let handle = bob.addDecryptionFailureListener(listener: good)
        // The same message twice, and the same sender and name again: one PostHog event.
        for _ in 0..<2 { try await expectFailure(bob, distinctBadEvent(1)) }
        await bob.setAnalyticsEnabled(enabled: false)
        try await expectFailure(bob, distinctBadEvent(2))
        await bob.setAnalyticsEnabled(enabled: true)
        await bob.setReportingPolicy(policy: ReportingPolicyFfi(analyticsEnabled: true, suppressionWindowSecs: 0, maxEventsPerMinute: nil))
        try await expectFailure(bob, distinctBadEvent(3))
        let flushed = await handle.flush(timeoutMs: 5000)
        XCTAssertTrue(flushed)
        XCTAssertEqual(good.events.count, 2)
        let stats = try parseJSON(await bob.reportingStatsJson())
        let counts = ((stats["total"] as? [String: Any])?["failures"] as? [String: Any])?["UnsupportedAlgorithm"] as? [String: Any]
        XCTAssertEqual(["seen", "reported", "suppressed_already_seen", "suppressed_disabled"].map { counts?[$0] as? Int }, [4, 2, 1, 1])
    }

    func testH_outboxAndSyncToken() async throws {
        let bob = try await makeBob()
        let (_, event) = try await encrypted(for: bob, content: #"{"n":1}"#)
        let results = try await bob.receiveSync(jsonArray: "[\(event)]", nextBatch: "s42_1")
        let token = try await bob.syncToken()
        XCTAssertEqual(token, "s42_1")
        guard case let .decrypted(decrypted) = results[0] else { return XCTFail("\(results[0])") }
        XCTAssertFalse(decrypted.reEmitted)
        // Not acknowledged yet: listed, and a re-delivery is a marked re-emission.
        let pending = try await bob.pendingDecryptedEvents()
        XCTAssertEqual(pending.map { [String($0.batch), String($0.index), $0.event.id] }, [["1", "0", decrypted.id]])
        let again = try await bob.decryptToDeviceEvent(json: event)
        XCTAssertTrue(again.reEmitted)
        try await bob.acknowledge(ids: [decrypted.id])
        let none = try await bob.pendingDecryptedEvents()
        XCTAssertEqual(none, [])
        let (reason, _) = try await expectFailure(bob, event)
        XCTAssertEqual(reason, .replayedMessage)
    }

    func testI_passphraseStore() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("store.sqlite3").path
        var bob: OlmMachine? = try await OlmMachine.openSqliteWithPassphrase(userId: "@bob:example.org", deviceId: "BOBDEVICE", path: path, passphrase: "correct horse")
        let curve = bob?.identityKeys().curve25519
        bob = nil
        let again = try await OlmMachine.openSqliteWithPassphrase(userId: "@bob:example.org", deviceId: "BOBDEVICE", path: path, passphrase: "correct horse")
        XCTAssertEqual(again.identityKeys().curve25519, curve)
        do {
            _ = try await OlmMachine.openSqliteWithPassphrase(userId: "@bob:example.org", deviceId: "BOBDEVICE", path: path, passphrase: "wrong")
            XCTFail("a wrong passphrase opened the store")
        } catch CryptoError.Store(let detail) {
            XCTAssertTrue(detail.contains("key"), detail)
        }
    }

    func testJ_taxonomyWithoutAMachine() throws {
        let reason = try XCTUnwrap(failureReasonFromName(name: "SessionWedged"))
        XCTAssertEqual(reason, .sessionWedged)
        XCTAssertEqual(failureReasonFromName(name: "ToDeviceFailedToDecrypt_SessionWedged"), reason)
        XCTAssertNil(failureReasonFromName(name: "DecryptionFailure"))
        XCTAssertEqual(reason.analyticsName(), "ToDeviceFailedToDecrypt_SessionWedged")
        let event = reason.posthogEvent()
        XCTAssertEqual(event.event, "Error")
        XCTAssertEqual(event.properties, ["domain": "TO_DEVICE", "name": "ToDeviceFailedToDecrypt_SessionWedged", "cryptoSDK": "Rust"])
        let info = reason.info()
        XCTAssertEqual(info.reason, reason)
        XCTAssertEqual(info.name, "SessionWedged")
        XCTAssertEqual(info.analyticsName, "ToDeviceFailedToDecrypt_SessionWedged")
        XCTAssertTrue(info.description.contains("none of them decrypts"), info.description)
        XCTAssertTrue(info.typicalRootCause.contains("ratchets diverged"), info.typicalRootCause)
        XCTAssertTrue(info.needsNewSession)
        XCTAssertFalse(FailureReasonFfi.malformedEvent.info().needsNewSession)
        XCTAssertEqual(Set(allFailureReasons().map { $0.info().analyticsName }).count, 17)
    }

    func testK_firstKeysUploadNeedsNoCall() async throws {
        let bob = try await makeBob()
        let body = await bob.keysForUpload()
        let upload = try parseJSON(try XCTUnwrap(body))
        XCTAssertEqual((upload["one_time_keys"] as? [String: Any])?.count, 25)
        XCTAssertEqual((upload["fallback_keys"] as? [String: Any])?.count, 1)
        XCTAssertEqual((upload["device_keys"] as? [String: Any])?["device_id"] as? String, "BOBDEVICE")
        try await bob.markKeysAsPublished()
        let nothing = await bob.keysForUpload()
        XCTAssertNil(nothing)
        let made = try await bob.receiveOneTimeKeyCount(serverCount: 20, fallbackKeyUnused: true)
        XCTAssertEqual(made, 5)
    }

    func testL_outgoingRequestsRecoverASession() async throws {
        let bob = try await makeBob()
        let carol = try await OlmMachine.openInMemory(userId: "@carol:example.org", deviceId: "CAROLDEVICE")
        let alice = try await OlmMachine.openInMemory(userId: "@alice:example.org", deviceId: "ALICEDEVICE")
        // Bob's keys as a server that hands out the same one-time key twice would serve them.
        let bobBody = await bob.keysForUpload()
        let bobUpload = try parseJSON(try XCTUnwrap(bobBody))
        try await bob.markKeysAsPublished()
        let served = try jsonText(["device_keys": bobUpload["device_keys"] as Any, "one_time_keys": firstEntry(bobUpload["one_time_keys"])])
        let first = try await carol.encryptFor(recipientKeysUploadJson: served, eventType: "m.dummy", contentJson: "{}")
        _ = try await bob.decryptToDeviceEvent(json: String(first.dropFirst().dropLast()))
        // Bob knows Alice's device, whose message was built on the key Carol used.
        let aliceBody = await alice.keysForUpload()
        let aliceUpload = try parseJSON(try XCTUnwrap(aliceBody))
        let query = try jsonText(["device_keys": ["@alice:example.org": ["ALICEDEVICE": aliceUpload["device_keys"] as Any]]])
        let learned = try await bob.receiveKeysQuery(json: query)
        XCTAssertEqual(learned.stored, 1)
        XCTAssertEqual(learned.rejected, [])
        XCTAssertEqual(learned.refusedKeyChanges, [])
        // Another account under Alice's device id: refused, reported with both keys, Alice's kept.
        let impostor = try await OlmMachine.openInMemory(userId: "@alice:example.org", deviceId: "ALICEDEVICE")
        let impostorBody = await impostor.keysForUpload()
        let impostorUpload = try parseJSON(try XCTUnwrap(impostorBody))
        let forged = try jsonText(["device_keys": ["@alice:example.org": ["ALICEDEVICE": impostorUpload["device_keys"] as Any]]])
        let refused = try await bob.receiveKeysQuery(json: forged)
        XCTAssertEqual(refused.stored, 0)
        XCTAssertEqual(refused.refusedKeyChanges.count, 1)
        let change = try XCTUnwrap(refused.refusedKeyChanges.first)
        XCTAssertEqual([change.userId, change.deviceId], ["@alice:example.org", "ALICEDEVICE"])
        let aliceKeys = (aliceUpload["device_keys"] as? [String: Any])?["keys"] as? [String: Any]
        let impostorKeys = (impostorUpload["device_keys"] as? [String: Any])?["keys"] as? [String: Any]
        XCTAssertEqual(change.knownEd25519, aliceKeys?["ed25519:ALICEDEVICE"] as? String)
        XCTAssertEqual(change.receivedEd25519, impostorKeys?["ed25519:ALICEDEVICE"] as? String)
        let second = try await alice.encryptFor(recipientKeysUploadJson: served, eventType: "m.dummy", contentJson: "{}")
        let (reason, _) = try await expectFailure(bob, String(second.dropFirst().dropLast()))
        XCTAssertEqual(reason, .unknownOneTimeKey)
        // Recovery: claim one of Alice's keys, then send her an Olm-encrypted m.dummy.
        let requests = try await bob.outgoingRequests()
        guard requests.count == 1, case let .keysClaim(claimId, claimBody) = requests[0] else { return XCTFail("\(requests)") }
        let claim = try parseJSON(claimBody)
        XCTAssertEqual(((claim["one_time_keys"] as? [String: Any])?["@alice:example.org"] as? [String: String]), ["ALICEDEVICE": "signed_curve25519"])
        let response = try jsonText(["one_time_keys": ["@alice:example.org": ["ALICEDEVICE": firstEntry(aliceUpload["one_time_keys"])]]])
        try await bob.markRequestAsSent(requestId: claimId, responseJson: response)
        let next = try await bob.outgoingRequests()
        guard next.count == 1, case let .toDevice(dummyId, eventType, _, body) = next[0] else { return XCTFail("\(next)") }
        XCTAssertEqual(eventType, "m.room.encrypted")
        let content = (((try parseJSON(body))["messages"] as? [String: Any])?["@alice:example.org"] as? [String: Any])?["ALICEDEVICE"]
        let event = try jsonText(["type": eventType, "sender": "@bob:example.org", "content": content as Any])
        let dummy = try await alice.decryptToDeviceEvent(json: event)
        XCTAssertEqual(dummy.eventType, "m.dummy")
        try await bob.markRequestAsSent(requestId: dummyId, responseJson: nil)
        let left = try await bob.outgoingRequests()
        XCTAssertEqual(left, [])
        do {
            try await bob.markRequestAsSent(requestId: dummyId, responseJson: nil)
            XCTFail("an unknown request id was accepted")
        } catch is CryptoError {}
    }

    func testM_flushWaitsForTheListener() async throws {
        let bob = try await makeBob()
        let listener = Collecting()
        let handle = bob.addDecryptionFailureListener(listener: listener)
        for n in 0..<3 { try await expectFailure(bob, distinctBadEvent(n)) }
        let flushed = await handle.flush(timeoutMs: 5000)
        XCTAssertTrue(flushed)
        XCTAssertEqual(listener.events.count, 3, "flush returned before delivery")
        handle.cancel()
        let afterCancel = await handle.flush(timeoutMs: 1000)
        XCTAssertFalse(afterCancel)
    }

    /// The README's Swift snippet, end to end: start, a batch with a decryptable, a plain and a
    /// failing event, acknowledgement, the failure in PostHog, and decryptOne both ways.
    func testN_readmeAdopterPath() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let server = RecordingUploader()
        let (machine, forwarding) = try await startCrypto(
            userId: "@bob:example.org", deviceId: "BOBDEVICE", storePath: dir.appendingPathComponent("crypto.sqlite3").path,
            storeKey: Data(repeating: 7, count: 32), server: server)
        XCTAssertEqual(server.bodies.count, 1)
        let upload = try parseJSON(try XCTUnwrap(server.bodies.first))
        XCTAssertEqual((upload["one_time_keys"] as? [String: Any])?.count, 25)
        let nothing = await machine.keysForUpload()
        XCTAssertNil(nothing, "the upload was not marked as published")

        // Alice got the published keys from the server (/keys/query, /keys/claim).
        let alice = try await OlmMachine.openInMemory(userId: "@alice:example.org", deviceId: "ALICEDEVICE")
        let published = try XCTUnwrap(server.bodies.first)
        let sendFromAlice = { (content: String) async throws -> String in
            String(try await alice.encryptFor(recipientKeysUploadJson: published, eventType: "m.dummy", contentJson: content).dropFirst().dropLast())
        }
        let before = PostHogSDK.shared.captured.count
        let event = try await sendFromAlice(#"{"n":1}"#)
        let plain = #"{"type":"m.dummy","sender":"@a:b","content":{}}"#
        let decrypted = try await receive(toDeviceEvents: "[\(event),\(plain),\(distinctBadEvent(42))]", nextBatch: "s7", machine: machine)
        XCTAssertEqual(decrypted.map(\.contentJson), [#"{"n":1}"#])
        let token = try await machine.syncToken()
        XCTAssertEqual(token, "s7")
        let pending = try await machine.pendingDecryptedEvents()
        XCTAssertEqual(pending, [], "receive() acknowledges what it returns")
        let flushed = await forwarding.flush(timeoutMs: 5000)
        XCTAssertTrue(flushed)
        let captured = PostHogSDK.shared.captured.dropFirst(before)
        XCTAssertEqual(captured.map(\.0), ["Error"])
        XCTAssertEqual(captured.first?.1 as? [String: String], expectedProperties)

        let failed = await decryptOne(distinctBadEvent(43), machine: machine)
        XCTAssertNil(failed)
        let one = await decryptOne(try await sendFromAlice(#"{"n":2}"#), machine: machine)
        XCTAssertEqual(one?.contentJson, #"{"n":2}"#)
    }

    func testSyncBatchAndSqliteStore() async throws {
        do {
            _ = try await OlmMachine.openSqlite(userId: "@bob:example.org", deviceId: "BOBDEVICE", path: "/nonexistent/x.db", storeKey: Data(count: 5))
            XCTFail("a short key was accepted")
        } catch CryptoError.InvalidStoreKey(let length) {
            XCTAssertEqual(length, 5)
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let bob = try await OlmMachine.openSqlite(userId: "@bob:example.org", deviceId: "BOBDEVICE", path: dir.appendingPathComponent("crypto.sqlite").path, storeKey: Data((0..<32).map { UInt8($0) }))
        let (_, json) = try await encrypted(for: bob, content: #"{"n":1}"#)
        let plain = #"{"type":"m.dummy","sender":"@a:b","content":{}}"#
        let results = try await bob.receiveToDeviceEvents(jsonArray: "[\(json),\(plain),\(badEvent)]")
        guard case .decrypted = results[0] else { return XCTFail("\(results[0])") }
        guard case .plaintext = results[1] else { return XCTFail("\(results[1])") }
        guard case let .failed(reason, _) = results[2] else { return XCTFail("\(results[2])") }
        XCTAssertEqual(reason, .unsupportedAlgorithm)
    }

    /// The once-per-message rule over 1,050 deliveries of one failing event (every call fails with
    /// the same reason, one PostHog payload), timed as the median of 5 rounds of 200 calls after 50
    /// warm-up calls: the protocol of the Rust baseline (benches/ratios.rs, row 7, no listener).
    func testZ_repeatedFailuresReportOnceAndMeasureOverhead() async throws {
        let bob = try await makeBob()
        let n = 200
        let rounds = 5
        var reasons = Set<FailureReasonFfi>()
        for _ in 0..<50 { reasons.insert(try await expectFailure(bob).0) } // warm-up
        var perCall: [Double] = []
        for _ in 0..<rounds {
            let start = Date()
            for _ in 0..<n { reasons.insert(try await expectFailure(bob).0) }
            perCall.append(Date().timeIntervalSince(start) / Double(n) * 1e6)
        }
        XCTAssertEqual(reasons, [.unsupportedAlgorithm])
        let stats = try parseJSON(await bob.reportingStatsJson())
        let counts = ((stats["total"] as? [String: Any])?["failures"] as? [String: Any])?["UnsupportedAlgorithm"] as? [String: Any]
        XCTAssertEqual(counts?["seen"] as? Int, 50 + n * rounds)
        XCTAssertEqual(counts?["reported"] as? Int, 1)
        let micros = perCall.sorted()[rounds / 2]
        print(String(format: "swift: decrypt_to_device_event overhead: %.1f us/event (median of %d rounds of %d failing events)", micros, rounds, n))
    }
}
