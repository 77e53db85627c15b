/// What the TOML parser (toml++ 3.4.0, inside TOMLKit) cannot be handed: it asserts — an abort
/// in debug and release builds alike, undefined behaviour where NDEBUG is set — on two shapes
/// the fuzzer found: a table header whose brackets are followed by anything but a key ("[\n",
/// "[[[1]]]", "[[="; fixed upstream in toml++ PR #301, not in the version TOMLKit bundles), and
/// a '}' where an array expects a value ("g=[}"). This scan finds both the way the parser
/// would meet them — headers are the first thing on a line outside a value that spans lines
/// (an array, a multi-line string) — so memlab reports a parse error where it would abort.
enum TOMLPrecheck {
    struct Problem: Error {
        let line: Int
        let column: Int
        let what: String
    }

    static func check(_ text: String) throws(Problem) {
        let b = Array(text.utf8)
        var i = 0, line = 1, lineStart = 0
        var open: [UInt8] = []      // the arrays ([) and inline tables ({) open in the current value
        var atLineStart = true      // outside any value, at the start of a line
        func isKeyStart(_ c: UInt8) -> Bool {
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x5F || c == 0x2D || c == 0x22 || c == 0x27
        }
        func newline() { line += 1; lineStart = i + 1 }
        func skipString(quote: UInt8) {
            let multi = i + 2 < b.count && b[i + 1] == quote && b[i + 2] == quote
            i += multi ? 3 : 1
            while i < b.count {
                let c = b[i]
                if c == 0x5C && quote == 0x22 { i += 2; continue }          // an escape in a basic string
                if c == 0x0A { if !multi { return }; newline() }
                if c == quote && (!multi || (i + 2 < b.count && b[i + 1] == quote && b[i + 2] == quote)) {
                    i += multi ? 3 : 1
                    return
                }
                i += 1
            }
        }
        while i < b.count {
            let c = b[i]
            if atLineStart {
                // The parser skips a byte-order mark and (leniently) Unicode spaces before a
                // header, so a non-ASCII byte here is passed over like a space.
                if c == 0x20 || c == 0x09 || c == 0x0D || c >= 0x80 { i += 1; continue }
                if c == 0x0A { newline(); i += 1; continue }
                atLineStart = false
                if c == 0x5B {                                           // a table header
                    var k = i + 1
                    if k < b.count && b[k] == 0x5B { k += 1 }
                    while k < b.count && (b[k] == 0x20 || b[k] == 0x09) { k += 1 }
                    if k < b.count && !isKeyStart(b[k]) && b[k] != 0x5D {
                        throw Problem(line: line, column: k - lineStart + 1, what: "a table header needs a key after its brackets")
                    }
                    // The rest of a header line holds no value that could span lines.
                    while i < b.count && b[i] != 0x0A { i += 1 }
                    continue
                }
                continue
            }
            switch c {
            case 0x22, 0x27: skipString(quote: c); continue
            case 0x23: while i < b.count && b[i] != 0x0A { i += 1 }; continue   // a comment
            case 0x5B, 0x7B: open.append(c)
            case 0x5D, 0x7D:
                if c == 0x7D && open.last == 0x5B {
                    throw Problem(line: line, column: i - lineStart + 1, what: "'}' inside an array, where a value or ']' belongs")
                }
                if !open.isEmpty { open.removeLast() }
            case 0x0A:
                newline()
                if open.isEmpty { atLineStart = true }
            default: break
            }
            i += 1
        }
    }
}
