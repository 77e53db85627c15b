import Guests

/// QMP as QEMU sends it (docs/architecture.md, Guests): the input cut at newlines, each line
/// through `QMPMessage.parse` — JSON decoding, the greeting, returns, errors and events, the
/// line bound. Accepted: every line is a QMP message.
extension FuzzTarget {
    static let qmp = FuzzTarget(name: "qmp", maxLen: 1 << 16, summary: "QMP lines from QEMU: greeting, return, error, event") { data in
        var all = true
        for line in data.split(separator: 0x0A, omittingEmptySubsequences: false) {
            do throws(QMPError) {
                switch try QMPMessage.parse(line) {
                case .event(let e): _ = e.time
                case .returned(let v): _ = v["status"]?.string; _ = v["ram"]?["transferred"]?.int
                default: break
                }
            } catch {
                _ = error.description
                all = false
            }
        }
        return all
    }
}
