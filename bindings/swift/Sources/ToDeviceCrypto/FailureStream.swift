// Hand-written (not generated): an AsyncStream over the pull-style FailureSubscription.

public extension FailureSubscription {
    /// The failures of this subscription as an `AsyncStream`. The subscription already exists, so
    /// failures that happen before iteration starts are not lost (up to the buffer of 1024). The
    /// stream finishes when the machine is gone; cancelling the iterating task stops it.
    func asAsyncStream() -> AsyncStream<PosthogErrorEvent> {
        AsyncStream { continuation in
            let task = Task {
                while !Task.isCancelled, let event = await self.next() {
                    continuation.yield(event)
                }
                continuation.finish()
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}

public extension OlmMachine {
    /// Every decryption failure from now on, as an `AsyncStream`.
    func decryptionFailures() -> AsyncStream<PosthogErrorEvent> {
        failureSubscription().asAsyncStream()
    }
}
