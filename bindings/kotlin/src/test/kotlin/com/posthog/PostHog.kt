// A stand-in for the PostHog Android SDK's `com.posthog.PostHog` (same package and `capture`
// signature), so that the README's Kotlin snippet compiles and runs unchanged in the suite.
package com.posthog

import java.util.concurrent.CopyOnWriteArrayList

object PostHog {
    /** What `capture` received: the event name and its properties. */
    val captured = CopyOnWriteArrayList<Pair<String, Map<String, Any>>>()

    fun capture(
        event: String,
        distinctId: String? = null,
        properties: Map<String, Any>? = null,
        userProperties: Map<String, Any>? = null,
        userPropertiesSetOnce: Map<String, Any>? = null,
        groups: Map<String, String>? = null,
    ) {
        captured.add(event to (properties ?: emptyMap()))
    }
}
