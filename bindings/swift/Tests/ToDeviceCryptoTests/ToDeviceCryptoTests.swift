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

// A stand-in for the PostHog iOS SDK, and the forwarding snippet an app would write.
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

final class PostHogForwarder: DecryptionFailureListener {
    func onDecryptionFailure(event: PosthogErrorEvent) {
        PostHogSDK.shared.capture(event.event, properties: event.properties)
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
        let handle = bob.addDecryptionFailureListener(listener: PostHogForwarder())
        try await expectFailure(bob)
        XCTAssertTrue(waitUntil { PostHogSDK.shared.captured.count == 1 })
        let (event, properties) = PostHogSDK.shared.captured[0]
        XCTAssertEqual(event, "Error")
        XCTAssertEqual(properties as? [String: String], expectedProperties)
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

    /// A measurement, not an assertion: the median of 5 rounds of 200 calls after 50 warm-up calls
    /// (the protocol of the Rust baseline, benches/ratios.rs row 7).
    func testZ_measureOverhead() async throws {
        let bob = try await makeBob()
        let n = 200
        let rounds = 5
        for _ in 0..<50 { try await expectFailure(bob) } // warm-up
        var perCall: [Double] = []
        for _ in 0..<rounds {
            let start = Date()
            for _ in 0..<n { try await expectFailure(bob) }
            perCall.append(Date().timeIntervalSince(start) / Double(n) * 1e6)
        }
        let micros = perCall.sorted()[rounds / 2]
        print(String(format: "swift: decrypt_to_device_event overhead: %.1f us/event (median of %d rounds of %d failing events)", micros, rounds, n))
    }
}
