// Hand-written (not generated): Kotlin Flow helpers over the pull-style FailureSubscription.
package org.matrix.todevicecrypto

import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.flow

/**
 * The failures of this subscription as a Flow. The subscription already exists, so failures that
 * happen before collection starts are not lost (up to the buffer of 1024). Collect it once; the
 * subscription is closed when collection ends or is cancelled.
 */
fun FailureSubscription.asFlow(): Flow<PosthogErrorEvent> = flow {
    use { subscription ->
        while (true) {
            val event = subscription.next() ?: break // null: the machine is gone
            emit(event)
        }
    }
}

/**
 * Every decryption failure from the moment collection starts, as a cold Flow; each collector gets its
 * own subscription. Use `failureSubscription().asFlow()` to subscribe eagerly instead.
 */
fun OlmMachine.decryptionFailures(): Flow<PosthogErrorEvent> = flow {
    failureSubscription().asFlow().collect { emit(it) }
}
