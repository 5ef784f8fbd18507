// swift-tools-version:5.7
//
// Swift package for the to-device-crypto UniFFI bindings.
//
// - Apple platforms: the Rust library comes as `ToDeviceCryptoFFI.xcframework` (built by
//   scripts/build-xcframework.sh; for a release, switch to `.binaryTarget(name:url:checksum:)` with the
//   zip URL and the checksum that script prints).
// - Linux (tests): a system-library target over the generated header and module map, linking
//   `libto_device_crypto.so` from the host build (pass `-Xlinker -L<dir>` and set LD_LIBRARY_PATH).
import PackageDescription

#if os(Linux)
let ffiTarget: Target = .systemLibrary(name: "ToDeviceCryptoFFI", path: "Sources/ToDeviceCryptoFFI")
#else
let ffiTarget: Target = .binaryTarget(name: "ToDeviceCryptoFFI", path: "ToDeviceCryptoFFI.xcframework")
#endif

let package = Package(
    name: "ToDeviceCrypto",
    platforms: [.iOS(.v16), .macOS(.v12)],
    products: [
        .library(name: "ToDeviceCrypto", targets: ["ToDeviceCrypto"]),
    ],
    targets: [
        ffiTarget,
        .target(name: "ToDeviceCrypto", dependencies: ["ToDeviceCryptoFFI"], path: "Sources/ToDeviceCrypto"),
        .testTarget(name: "ToDeviceCryptoTests", dependencies: ["ToDeviceCrypto"], path: "Tests/ToDeviceCryptoTests"),
    ]
)
