import Foundation
import Testing
@testable import LabKit

/// Sweep syntax, expansion and how a sweep is recorded in the result document.
@Suite struct SweepTests {
    struct Fake: Scenario {
        let id = "fake"
        let summary = "a scenario for tests"
        let variants = [Variant("v", "only")]
        let parameters: [ParameterSpec] = [
            ParameterSpec("size", .size(4096...(1 << 40)), default: .int(1 << 20), help: ""),
            ParameterSpec("pages", .int(1...1_000_000), default: .int(16), help: ""),
            ParameterSpec("ratio", .double(0...1), default: .double(0.5), help: ""),
            ParameterSpec("mode", .choice(["madvise", "prctl"]), default: .string("madvise"), help: ""),
        ]
        func run(_ context: RunContext) throws {}
    }
    let fake = Fake()
    func spec(_ name: String) -> ParameterSpec { fake.parameters.first { $0.name == name }! }

    @Test func lists() throws {
        #expect(try Sweep.values("1024,4096,16384", for: spec("pages")) == [.int(1024), .int(4096), .int(16384)])
        #expect(try Sweep.values("4K, 64K", for: spec("size")) == [.int(4096), .int(65536)])
        #expect(try Sweep.values("madvise,prctl", for: spec("mode")) == [.string("madvise"), .string("prctl")])
        #expect(throws: UsageError.self) { try Sweep.values("1,,2", for: spec("pages")) }
        #expect(throws: UsageError.self) { try Sweep.values("1,1", for: spec("pages")) }
        #expect(throws: UsageError.self) { try Sweep.values("1,0", for: spec("pages")) }   // out of range
    }

    @Test func ranges() throws {
        let sizes = try Sweep.values("64M..4G x2", for: spec("size"))
        #expect(sizes.count == 7)
        #expect(sizes.first == .int(64 << 20) && sizes.last == .int(4 << 30))
        #expect(try Sweep.values("64M..4Gx4", for: spec("size")).count == 4)
        #expect(try Sweep.values("100..1000 +300", for: spec("pages")) == [.int(100), .int(400), .int(700), .int(1000)])
        #expect(try Sweep.values("1..4", for: spec("pages")) == [.int(1), .int(2), .int(3), .int(4)])
        #expect(try Sweep.values("0..1 +0.25", for: spec("ratio")) == [0, 0.25, 0.5, 0.75, 1].map { .double($0) })
        #expect(try Sweep.values("0..0.3 +0.1", for: spec("ratio")).last == .double(0.3))
        #expect(throws: UsageError.self) { try Sweep.values("4G..64M x2", for: spec("size")) }
        #expect(throws: UsageError.self) { try Sweep.values("0..1", for: spec("ratio")) }
        #expect(throws: UsageError.self) { try Sweep.values("1..2", for: spec("mode")) }
        #expect(throws: UsageError.self) { try Sweep.values("1..10 x1", for: spec("pages")) }
        #expect(throws: UsageError.self) { try Sweep.values("1..1000000", for: spec("pages")) }
    }

    @Test func commandLineExpandsToTheProduct() throws {
        let split = try Sweep.split([("pages", "1,2,3"), ("mode", "madvise,prctl"), ("ratio", "0.25")], for: fake)
        #expect(split.fixed == ["ratio": .double(0.25)])
        #expect(split.axes.map(\.parameter) == ["pages", "mode"])
        let points = try Sweep.expand(fake, variant: "v", fixed: split.fixed, axes: split.axes, group: 1)
        #expect(points.count == 6)
        // The first axis varies slowest; every point has every parameter.
        #expect(points.map { $0.0["pages"]! } == [1, 1, 2, 2, 3, 3].map { .int($0) })
        #expect(points.map { $0.0["mode"]! }.prefix(2) == [.string("madvise"), .string("prctl")])
        #expect(points.allSatisfy { $0.0["ratio"] == .double(0.25) && $0.0["size"] == .int(1 << 20) })
        let info = try #require(points[3].1)
        #expect(info.point == 4 && info.points == 6 && info.group == 1)
        #expect(info.parameters[0] == SweepAxis(parameter: "pages", values: [1, 2, 3].map { .int($0) }))
        // No sweep: one point, no sweep record.
        let one = try Sweep.expand(fake, variant: "v", fixed: [:], axes: [], group: 0)
        #expect(one.count == 1 && one[0].1 == nil)
        #expect(throws: UsageError.self) { try Sweep.split([("nope", "1,2")], for: fake) }
    }

    @Test func scenarioFileListsAndRangeStrings() throws {
        let file = try ScenarioFile.parse("""
        scenario = "fake"
        [params]
        pages = [100, 1000, 10000]
        size = "64M..256M x2"
        ratio = 0.5
        """)
        let e = file.entries[0]
        let split = try Sweep.split(e, for: fake)
        #expect(split.fixed == ["ratio": .double(0.5)])
        #expect(Set(split.axes.map(\.parameter)) == ["pages", "size"])
        #expect(split.axes.first { $0.parameter == "size" }!.values == [64, 128, 256].map { .int($0 << 20) })
        // The command line replaces a file's sweep (or value) parameter by parameter.
        let merged = Sweep.merge(split, over: try Sweep.split([("pages", "7")], for: fake))
        #expect(merged.fixed["pages"] == .int(7))
        #expect(merged.axes.map(\.parameter) == ["size"])
        #expect(try Sweep.expand(fake, variant: "v", fixed: merged.fixed, axes: merged.axes, group: 1).count == 3)
    }

    @Test func sweepIsRecordedAdditively() throws {
        var run = RunResult(scenario: "fake", variant: "v", params: Params(["pages": .int(2)]), placement: Placement(), status: .ok,
                            reason: nil, settings: SettingsRecord(), repetitions: 1, warmup: 0)
        let plain = String(decoding: try JSONEncoder().encode(run), as: UTF8.self)
        #expect(!plain.contains("sweep"))   // documents without sweeps keep their shape
        run.sweep = SweepInfo(group: 1, point: 2, points: 3, parameters: [SweepAxis(parameter: "pages", values: [1, 2, 3].map { .int($0) })])
        let data = try JSONEncoder().encode(run)
        let object = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let sweep = try #require(object["sweep"] as? [String: Any])
        #expect(sweep["point"] as? Int == 2 && sweep["points"] as? Int == 3 && sweep["group"] as? Int == 1)
        let axes = try #require(sweep["parameters"] as? [[String: Any]])
        #expect(axes[0]["parameter"] as? String == "pages")
        #expect(axes[0]["values"] as? [Int] == [1, 2, 3])
        #expect(try JSONDecoder().decode(RunResult.self, from: data).sweep == run.sweep)
    }
}
