import Testing
@testable import LabKit

/// Typed parameters and variants (issue 12): declared once, read as typed values, one place
/// for the unknown-parameter error, and the check the runner makes before a run.
@Suite struct TypedParameterTests {
    struct Toy: TypedScenario {
        let id = "toy"
        let summary = "a typed scenario for tests"

        enum Variant: String, ScenarioVariant {
            case fill
            case fillTwice = "fill-twice"
            var summary: String { self == .fill ? "fill once" : "fill twice" }
        }
        enum Mode: String, CaseIterable, ParameterChoice { case madvise, prctl }

        struct Parameters: ParameterSet {
            let pages = Parameter<Int>("pages", 1...100_000, default: 1024, unit: .pages, help: "pages to map")
            let size = Parameter<Int>("size", 4096...(1 << 32), default: 1 << 20, unit: .bytes, help: "region size")
            let ratio = Parameter<Double>("ratio", 0...1, default: 0.5, unit: .ratio, help: "duplicate fraction")
            let zeroPages = Parameter<Bool>("zero_pages", default: false, help: "use_zero_pages")
            let mode = Parameter<Mode>("mode", default: .madvise, help: "opt-in")
            let path = Parameter<String>("path", text: "", help: "a file")
        }

        func validate(_ variant: Variant, _ p: Values) throws(UsageError) {
            if variant == .fillTwice && p.mode == .prctl { throw UsageError("fill-twice goes with mode=madvise") }
        }
        func deadline(_ variant: Variant, _ p: Values) -> Double { Double(p.pages) }
        func memoryLimit(_ variant: Variant, _ p: Values) -> Int? { variant == .fillTwice ? 2 * p.size : nil }
        func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
            ctx.record("pages", Double(p.pages * (variant == .fillTwice ? 2 : 1)), .pages, better: .none)
            ctx.record("ratio", p.ratio, .ratio, better: .none)
            ctx.note("mode \(p.mode.rawValue) zero_pages \(p.zeroPages) path '\(p.path)' size \(p.size)")
        }
    }
    let toy = Toy()

    @Test func declarationsBecomeSpecsInOrderWithUnits() {
        #expect(toy.parameters.map(\.name) == ["pages", "size", "ratio", "zero_pages", "mode", "path"])
        #expect(toy.parameters.map(\.unit) == [.pages, .bytes, .ratio, .none, .none, .none])
        #expect(toy.parameterUnits == ["pages": "pages", "size": "bytes", "ratio": "ratio", "zero_pages": "none", "mode": "none", "path": "none"])
        // A byte count is a size: it takes suffixes.
        #expect(toy.parameters[1].typeDescription.hasPrefix("size"))
        #expect(toy.parameters[4].typeDescription == "madvise|prctl")
        #expect(toy.parameters[0].defaultValue == .int(1024))
        #expect(toy.parameters[4].defaultValue == .string("madvise"))
    }

    @Test func variantsComeFromTheEnum() throws {
        #expect(toy.variants.map(\.name) == ["fill", "fill-twice"])
        #expect(toy.variants.map(\.summary) == ["fill once", "fill twice"])
        let registry = Registry([toy])
        #expect(try registry.lookup("toy").1 == "fill")
        #expect(try registry.lookup("toy:fill-twice").1 == "fill-twice")
        #expect(throws: UsageError.self) { try registry.lookup("toy:fill-thrice") }
    }

    @Test func resolvedTextDecodesToTypedValues() throws {
        let params = try toy.resolve(variant: "fill", text: ["pages": "77", "size": "64K", "mode": "prctl", "zero_pages": "yes", "path": "/x"])
        let (variant, p) = try toy.decode(variant: "fill", params: params)
        #expect(variant == .fill)
        #expect(p.pages == 77)
        #expect(p.size == 64 << 10)
        #expect(p.ratio == 0.5)
        #expect(p.zeroPages)
        #expect(p.mode == .prctl)
        #expect(p.path == "/x")
        #expect(p.params == params)
        // The string-facing hooks reach the typed ones.
        #expect(toy.deadline(variant: "fill", params: params) == 77)
        #expect(toy.memoryLimit(variant: "fill-twice", params: params) == 2 * (64 << 10))
        #expect(toy.memoryLimit(variant: "fill", params: params) == nil)
    }

    @Test func aWholeNumberReadsAsADouble() throws {
        // A double written as 1 in JSON (a child spec, a result) comes back as .int(1).
        var params = try toy.resolve(variant: "fill", overrides: [:])
        params.values["ratio"] = .int(1)
        #expect(try toy.decode(variant: "fill", params: params).1.ratio == 1.0)
    }

    @Test func typedValidateRunsOnResolve() throws {
        let e = try #require(usageError { () throws(UsageError) in try toy.resolve(variant: "fill-twice", text: ["mode": "prctl"]) })
        #expect(e.message.contains("fill-twice goes with mode=madvise"))
        _ = try toy.resolve(variant: "fill", text: ["mode": "prctl"])
    }

    @Test func oneMessageForAnUnknownParameterEverywhere() throws {
        let expected = "scenario 'toy' has no parameter 'pagez'; its parameters are: pages, size, ratio, zero_pages, mode, path"
        let messages: [String?] = [
            usageError { () throws(UsageError) in try toy.resolve(variant: "fill", text: ["pagez": "1"]) }?.message,
            usageError { () throws(UsageError) in try toy.resolve(variant: "fill", overrides: ["pagez": .int(1)]) }?.message,
            usageError { () throws(UsageError) in try toy.parse(parameter: "pagez", "1") }?.message,
            usageError { () throws(UsageError) in try Sweep.split([("pagez", "1,2")], for: toy) }?.message,
            usageError { () throws(UsageError) in
                try Sweep.split(ScenarioFile.Entry(scenario: "toy", params: ["pagez": .int(1)]), for: toy)
            }?.message,
            usageError { () throws(UsageError) in try toy.check(variant: "fill", params: Params(["pagez": .int(1)])) }?.message,
        ]
        for m in messages { #expect(m == expected) }
    }

    @Test func checkRefusesWhatResolveWouldNotMake() throws {
        let good = try toy.resolve(variant: "fill", overrides: [:])
        try toy.check(variant: "fill", params: good)
        var missing = good
        missing.values["pages"] = nil
        #expect(throws: UsageError.self) { try toy.check(variant: "fill", params: missing) }
        var wrong = good
        wrong.values["mode"] = .string("always")
        #expect(throws: UsageError.self) { try toy.check(variant: "fill", params: wrong) }
        #expect(throws: UsageError.self) { try toy.check(variant: "fill-thrice", params: good) }
    }

    @Test func theChildDecodesOnceAndRunsTyped() throws {
        let params = try toy.resolve(variant: "fill-twice", text: ["pages": "10", "ratio": "0.25"])
        let ctx = RunContext(variant: "fill-twice", params: params, repetition: 1, isWarmup: false)
        try toy.run(ctx)
        #expect(ctx.output.metrics.map(\.value) == [20, 0.25])
        // Parameters that do not decode end the repetition as failed, with the reason.
        var bad = params
        bad.values["pages"] = .string("ten")
        let failing = RunContext(variant: "fill", params: bad, repetition: 1, isWarmup: false)
        do {
            try toy.run(failing)
            Issue.record("run with undecodable parameters did not fail")
        } catch let e as ScenarioError {
            #expect(e.description.contains("parameters: parameter 'pages'"))
        }
    }

    @Test func typedParseAndDecode() throws {
        let size = Toy.Parameters().size
        #expect(try size.parse("2M") == 2 << 20)
        #expect(throws: UsageError.self) { try size.parse("1K") }
        let mode = Toy.Parameters().mode
        #expect(try mode.decode(.string("prctl")) == .prctl)
        #expect(throws: UsageError.self) { try mode.decode(.string("never")) }
        #expect(throws: UsageError.self) { try mode.decode(.int(1)) }
    }
}

private func usageError<T>(_ body: () throws(UsageError) -> T) -> UsageError? {
    do {
        _ = try body()
        return nil
    } catch {
        return error
    }
}
