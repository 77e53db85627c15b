/// The kernel's CPU list format ("0", "0,2", "0-3,8-11"): what /sys/devices/system/cpu/online
/// holds and what `--cpus` takes. Parsed strictly and without trapping: digits only (no sign),
/// each range low to high, every number below `limit`.
public enum CPUList {
    /// The largest CONFIG_NR_CPUS a kernel can be built with.
    public static let limit = 8192

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case empty
        case badItem(String)
        case backwards(String)
        case tooLarge(String)
        public var description: String {
            switch self {
            case .empty: return "an empty list"
            case .badItem(let s): return "'\(s)' is not a CPU number or a range N-M"
            case .backwards(let s): return "the range '\(s)' runs backwards"
            case .tooLarge(let s): return "'\(s)' is beyond the largest CPU number a kernel can have (\(limit - 1))"
            }
        }
    }

    /// CPU numbers in the order given, without duplicates.
    public static func parse(_ text: String) throws(ParseError) -> [Int] {
        let trimmed = text.filter { $0 != "\n" && $0 != " " }
        if trimmed.isEmpty { throw .empty }
        var out: [Int] = []
        var seen = Set<Int>()
        for item in trimmed.split(separator: ",", omittingEmptySubsequences: false) {
            let bounds = item.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false)
            guard let lo = number(bounds[0], item), let hi = bounds.count == 2 ? number(bounds[1], item) : lo else {
                throw .badItem(String(item))
            }
            if lo < 0 || hi < 0 { throw .tooLarge(String(item)) }
            if lo > hi { throw .backwards(String(item)) }
            for c in lo...hi where seen.insert(c).inserted { out.append(c) }
        }
        return out
    }

    /// A decimal number below `limit`; nil for anything else ("", "-1", "+1", "1e3"); -1 for
    /// digits that spell a number too large.
    private static func number(_ s: Substring, _ item: Substring) -> Int? {
        guard !s.isEmpty, s.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
        let digits = s.drop { $0 == "0" }
        if digits.utf8.count > 5 { return -1 }
        guard let v = digits.isEmpty ? 0 : Int(digits), v < limit else { return -1 }
        return v
    }
}
