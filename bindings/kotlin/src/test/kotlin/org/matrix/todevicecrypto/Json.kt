// A minimal JSON reader and writer for the tests: the API passes JSON text, and a plain JVM has no
// JSON library on its class path (Android has org.json; the suite runs without Gradle).
package org.matrix.todevicecrypto

/** Parses JSON text into Map<String, Any?> / List<Any?> / String / Double / Boolean / null. */
fun parseJson(text: String): Any? {
    var i = 0
    fun ws() { while (i < text.length && text[i].isWhitespace()) i++ }
    fun fail(): Nothing = throw IllegalArgumentException("bad JSON at $i: ${text.take(80)}")
    fun value(): Any? {
        ws()
        if (i >= text.length) fail()
        return when (text[i]) {
            '{' -> {
                i++
                val map = LinkedHashMap<String, Any?>()
                ws()
                if (text[i] == '}') { i++; return map }
                while (true) {
                    ws()
                    val key = value() as? String ?: fail()
                    ws(); if (text[i++] != ':') fail()
                    map[key] = value()
                    ws()
                    when (text[i++]) { ',' -> continue; '}' -> return map; else -> fail() }
                }
                @Suppress("UNREACHABLE_CODE") map
            }
            '[' -> {
                i++
                val list = ArrayList<Any?>()
                ws()
                if (text[i] == ']') { i++; return list }
                while (true) {
                    list.add(value())
                    ws()
                    when (text[i++]) { ',' -> continue; ']' -> return list; else -> fail() }
                }
                @Suppress("UNREACHABLE_CODE") list
            }
            '"' -> {
                i++
                val out = StringBuilder()
                while (text[i] != '"') {
                    if (text[i] == '\\') {
                        i++
                        when (val c = text[i]) {
                            'n' -> out.append('\n'); 't' -> out.append('\t'); 'r' -> out.append('\r')
                            'b' -> out.append('\b'); 'f' -> out.append('\u000c')
                            'u' -> { out.append(text.substring(i + 1, i + 5).toInt(16).toChar()); i += 4 }
                            else -> out.append(c)
                        }
                    } else {
                        out.append(text[i])
                    }
                    i++
                }
                i++
                out.toString()
            }
            't' -> { i += 4; true }
            'f' -> { i += 5; false }
            'n' -> { i += 4; null }
            else -> {
                val start = i
                while (i < text.length && text[i] in "+-0123456789.eE") i++
                text.substring(start, i).toDoubleOrNull() ?: fail()
            }
        }
    }
    val result = value()
    ws()
    if (i != text.length) fail()
    return result
}

/** Writes Map / List / String / Number / Boolean / null as JSON text. */
fun toJson(value: Any?): String = when (value) {
    null -> "null"
    is String -> buildString {
        append('"')
        for (c in value) {
            when {
                c == '"' -> append("\\\"")
                c == '\\' -> append("\\\\")
                c < ' ' -> append("\\u%04x".format(c.code))
                else -> append(c)
            }
        }
        append('"')
    }
    is Map<*, *> -> value.entries.joinToString(",", "{", "}") { (k, v) -> toJson(k as String) + ":" + toJson(v) }
    is List<*> -> value.joinToString(",", "[", "]") { toJson(it) }
    is Double -> if (value == Math.floor(value) && !value.isInfinite()) value.toLong().toString() else value.toString()
    is Number, is Boolean -> value.toString()
    else -> throw IllegalArgumentException("not JSON: $value")
}

@Suppress("UNCHECKED_CAST")
fun Any?.obj(key: String): Map<String, Any?> = (this as Map<String, Any?>)[key] as Map<String, Any?>
