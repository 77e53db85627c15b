import Testing
@testable import LabKit

private func near(_ a: Double, _ b: Double, within tolerance: Double = 1e-9) -> Bool {
    abs(a - b) <= tolerance
}

@Suite struct StatisticsTests {
    @Test func emptyInputHasNoSummary() {
        #expect(Statistics.summarize([]) == nil)
    }

    @Test func singleSample() throws {
        let s = try #require(Statistics.summarize([7.5]))
        #expect(s.median == 7.5)
        #expect(s.mean == 7.5)
        #expect(s.stddev == 0)
        #expect(s.min == 7.5)
        #expect(s.max == 7.5)
        #expect(s.ci95 == nil)
    }

    @Test func medianOfOddCountIsTheMiddleValue() throws {
        // Unsorted on purpose: the median is of the sorted samples.
        let s = try #require(Statistics.summarize([9, 1, 4, 100, 2]))
        #expect(s.median == 4)
        #expect(s.min == 1)
        #expect(s.max == 100)
        #expect(near(s.mean, 116.0 / 5))
    }

    @Test func medianOfEvenCountIsTheMeanOfTheTwoMiddleValues() throws {
        let s = try #require(Statistics.summarize([10, 4, 1, 7]))
        #expect(s.median == 5.5)   // (4 + 7) / 2
        #expect(s.mean == 5.5)
        #expect(s.min == 1)
        #expect(s.max == 10)
        let t = try #require(Statistics.summarize([3, 1]))
        #expect(t.median == 2)
    }

    @Test func sampleStandardDeviationUsesNMinusOne() throws {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, squared deviations sum 32;
        // population sd would be 2, sample sd is sqrt(32 / 7).
        let s = try #require(Statistics.summarize([2, 4, 4, 4, 5, 5, 7, 9]))
        #expect(s.mean == 5)
        #expect(near(s.stddev, (32.0 / 7).squareRoot()))
        #expect(!near(s.stddev, 2))
        #expect(s.median == 4.5)
    }

    @Test func ci95OfOneToFive() throws {
        let s = try #require(Statistics.summarize([1, 2, 3, 4, 5]))
        #expect(s.mean == 3)
        #expect(s.median == 3)
        let sd = (10.0 / 4).squareRoot()   // squared deviations 4+1+0+1+4
        #expect(near(s.stddev, sd))
        let ci = try #require(s.ci95)
        try #require(ci.count == 2)
        let half = 2.776 * sd / 5.0.squareRoot()   // t(0.975, df 4) = 2.776
        #expect(near(ci[0], 3 - half))
        #expect(near(ci[1], 3 + half))
        #expect(near(half, 1.9629, within: 1e-4))
    }

    @Test func ci95IsSymmetricAroundTheMeanForTwoSamples() throws {
        let s = try #require(Statistics.summarize([10, 12]))
        let ci = try #require(s.ci95)
        // sd = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2) = 12.706
        #expect(near(ci[0], 11 - 12.706))
        #expect(near(ci[1], 11 + 12.706))
    }

    @Test func identicalSamplesHaveZeroSpread() throws {
        let s = try #require(Statistics.summarize([3, 3, 3]))
        #expect(s.stddev == 0)
        #expect(s.ci95 == [3, 3])
    }

    @Test(arguments: [(1, 12.706), (4, 2.776), (30, 2.042), (100, 1.984)])
    func tQuantile975(df: Int, expected: Double) {
        #expect(near(Statistics.tQuantile975(degreesOfFreedom: df), expected, within: 1e-9))
    }

    @Test func tQuantileDecreasesTowardsTheNormalQuantile() {
        var previous = Double.infinity
        for df in 1...200 {
            let t = Statistics.tQuantile975(degreesOfFreedom: df)
            #expect(t < previous, "t(0.975, \(df)) = \(t) is not below t(0.975, \(df - 1)) = \(previous)")
            #expect(t > 1.96)
            previous = t
        }
    }
}
