import Testing
@testable import LabKit

/// Runs `body` and returns the UsageError it threw, or nil when it did not throw.
private func usageError(_ body: () throws(UsageError) -> ParamValue) -> UsageError? {
    do {
        _ = try body()
        return nil
    } catch {
        return error
    }
}

@Suite struct ParameterSpecTests {
    let pages = ParameterSpec("pages", .int(1...100_000), default: .int(1024), help: "pages to map")
    let size = ParameterSpec("region", .size(4096...(1 << 32)), default: .int(1 << 20), help: "region size")
    let ratio = ParameterSpec("ratio", .double(0...1), default: .double(0.5), help: "duplicate fraction")
    let flag = ParameterSpec("zero_pages", .bool, default: .bool(false), help: "use_zero_pages")
    let mode = ParameterSpec("mode", .choice(["madvise", "prctl"]), default: .string("madvise"), help: "opt-in")

    // MARK: int

    @Test func intParsesAndAccepts() throws {
        #expect(try pages.parse("1") == .int(1))
        #expect(try pages.parse(" 4096 ") == .int(4096))
        #expect(try pages.parse("100000") == .int(100_000))
        #expect(try pages.accept(.int(77)) == .int(77))
    }

    @Test func intOutOfRangeNamesTheParameter() throws {
        let low = try #require(usageError { () throws(UsageError) in try pages.parse("0") })
        #expect(low.message.contains("'pages'"))
        #expect(low.message.contains("out of range"))
        #expect(low.message.contains("1...100000"))
        let high = try #require(usageError { () throws(UsageError) in try pages.accept(.int(100_001)) })
        #expect(high.message.contains("pages"))
        #expect(high.message.contains("100001"))
    }

    @Test func intRejectsNonIntegers() throws {
        let e = try #require(usageError { () throws(UsageError) in try pages.parse("12.5") })
        #expect(e.message.contains("pages"))
        #expect(e.message.contains("not an integer"))
        #expect(throws: UsageError.self) { try pages.parse("many") }
        #expect(throws: UsageError.self) { try pages.parse("") }
    }

    // MARK: size

    @Test func parseSizeSuffixes() {
        #expect(parseSize("4096") == 4096)
        #expect(parseSize("64K") == 64 * 1024)
        #expect(parseSize("256M") == 256 * 1024 * 1024)
        #expect(parseSize("2G") == 2 * 1024 * 1024 * 1024)
        #expect(parseSize("1T") == 1 << 40)
        #expect(parseSize("1GiB") == 1 << 30)
        #expect(parseSize("64KB") == 64 * 1024)
        #expect(parseSize("2m") == 2 << 20)
        #expect(parseSize("0K") == 0)
    }

    @Test func parseSizeRejectsGarbage() {
        #expect(parseSize("bad") == nil)
        #expect(parseSize("") == nil)
        #expect(parseSize("K") == nil)
        #expect(parseSize("12X") == nil)
        #expect(parseSize("1.5G") == nil)
        #expect(parseSize("-1K") == nil)
        #expect(parseSize("99999999999999999T") == nil)   // overflows Int
    }

    @Test func sizeParameter() throws {
        #expect(try size.parse("64K") == .int(65536))
        #expect(try size.parse("2G") == .int(2 << 30))
        #expect(try size.accept(.string("256M")) == .int(256 << 20))   // from a scenario file
        #expect(try size.accept(.int(8192)) == .int(8192))
        let small = try #require(usageError { () throws(UsageError) in try size.parse("1K") })
        #expect(small.message.contains("region"))
        #expect(small.message.contains("out of range"))
        let bad = try #require(usageError { () throws(UsageError) in try size.parse("bad") })
        #expect(bad.message.contains("region"))
        #expect(bad.message.contains("not a size"))
    }

    // MARK: double

    @Test func doubleParsesAndAcceptsAnInt() throws {
        #expect(try ratio.parse("0.25") == .double(0.25))
        #expect(try ratio.accept(.double(1)) == .double(1))
        // A whole number in a scenario file (ratio = 1) arrives as an int.
        #expect(try ratio.accept(.int(1)) == .double(1))
        #expect(try ratio.accept(.int(0)) == .double(0))
        #expect(throws: UsageError.self) { try ratio.accept(.int(2)) }
        #expect(throws: UsageError.self) { try ratio.parse("1.5") }
        #expect(throws: UsageError.self) { try ratio.parse("nan") }
        #expect(throws: UsageError.self) { try ratio.parse("inf") }
        #expect(throws: UsageError.self) { try ratio.parse("half") }
    }

    // MARK: bool

    @Test(arguments: ["true", "1", "yes", "on", "TRUE", "Yes", " on "])
    func boolTrueSpellings(text: String) throws {
        #expect(try flag.parse(text) == .bool(true))
    }

    @Test(arguments: ["false", "0", "no", "off", "False", "OFF"])
    func boolFalseSpellings(text: String) throws {
        #expect(try flag.parse(text) == .bool(false))
    }

    @Test func boolRejectsOtherText() throws {
        let e = try #require(usageError { () throws(UsageError) in try flag.parse("maybe") })
        #expect(e.message.contains("zero_pages"))
        #expect(e.message.contains("true|false"))
        #expect(try flag.accept(.bool(true)) == .bool(true))
        #expect(throws: UsageError.self) { try flag.accept(.int(1)) }
    }

    // MARK: choice

    @Test func choiceAcceptsOnlyListedValues() throws {
        #expect(try mode.parse("prctl") == .string("prctl"))
        #expect(try mode.accept(.string("madvise")) == .string("madvise"))
        let e = try #require(usageError { () throws(UsageError) in try mode.parse("always") })
        #expect(e.message.contains("mode"))
        #expect(e.message.contains("not one of the choices"))
        #expect(e.message.contains("madvise|prctl"))
        #expect(throws: UsageError.self) { try mode.parse("Prctl") }   // case matters
    }

    // MARK: types

    @Test func wrongTypeIsRejected() throws {
        let e = try #require(usageError { () throws(UsageError) in try pages.accept(.string("ten")) })
        #expect(e.message.contains("pages"))
        #expect(e.message.contains("wrong type"))
        #expect(throws: UsageError.self) { try pages.accept(.double(3)) }
        #expect(throws: UsageError.self) { try pages.accept(.bool(true)) }
        #expect(throws: UsageError.self) { try mode.accept(.int(1)) }
        #expect(throws: UsageError.self) { try ratio.accept(.string("0.5")) }
        #expect(throws: UsageError.self) { try size.accept(.double(4096)) }
    }

    @Test func resolveUsesDefaultsUnlessOverridden() {
        let p = Params.resolve([pages, ratio, mode], overrides: ["mode": .string("prctl")])
        #expect(p["pages"] == .int(1024))
        #expect(p["ratio"] == .double(0.5))
        #expect(p["mode"] == .string("prctl"))
    }
}
