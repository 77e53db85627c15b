#if canImport(Glibc)
import Glibc
#endif

/// Inline SVG charts for the HTML report: no script, no external resource. Every chart is a
/// `<figure class="chart chart-KIND" id="...">` holding one `<svg class="chart-svg">` with a
/// `<title>`, labelled axes (with units), and its data as paths, circles or rects.
public enum SVGChart {
    public struct Point: Sendable {
        public var x: Double
        public var y: Double
        /// Optional spread (e.g. min and max of the samples), drawn as a whisker.
        public var low: Double?
        public var high: Double?
        public init(x: Double, y: Double, low: Double? = nil, high: Double? = nil) {
            self.x = x
            self.y = y
            self.low = low
            self.high = high
        }
    }

    public struct Series: Sendable {
        public var name: String
        public var points: [Point]
        public init(name: String, points: [Point]) {
            self.name = name
            self.points = points
        }
    }

    public struct Axis: Sendable {
        public var label: String
        public var unit: String
        public var log: Bool
        /// Explicit tick positions (e.g. the swept values); nil: chosen from the range.
        public var ticks: [Double]?
        public init(label: String, unit: String, log: Bool = false, ticks: [Double]? = nil) {
            self.label = label
            self.unit = unit
            self.log = log
            self.ticks = ticks
        }
        var title: String { unit.isEmpty || unit == label ? label : "\(label) (\(unit))" }
    }

    public struct Bar: Sendable {
        public var label: String
        public var value: Double
        public var low: Double?
        public var high: Double?
        public init(label: String, value: Double, low: Double? = nil, high: Double? = nil) {
            self.label = label
            self.value = value
            self.low = low
            self.high = high
        }
    }

    static let width = 600.0, height = 320.0
    static let left = 78.0, right = 16.0, top = 34.0, bottom = 58.0
    public static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]

    /// A line chart (markers on every point, whiskers where given).
    public static func line(id: String, kind: String, title: String, x: Axis, y: Axis, series: [Series], caption: String = "", steps: Bool = false) -> String {
        let all = series.flatMap(\.points)
        guard !all.isEmpty else { return "" }
        let xs = all.map(\.x), ys = all.flatMap { [$0.y, $0.low ?? $0.y, $0.high ?? $0.y] }
        let xScale = Scale(values: xs, log: x.log, includeZero: false, plotLow: left, plotHigh: width - right)
        let yScale = Scale(values: ys, log: y.log, includeZero: !y.log, plotLow: height - bottom, plotHigh: top)
        let many = series.count > 1
        let legendNames = many ? Array(series.map(\.name).prefix(12)) : []
        var svg = open(id: id, kind: kind, title: title, extraHeight: legendHeight(legendNames))
        svg += axes(x: x, xScale: xScale, y: y, yScale: yScale)
        for (i, s) in series.enumerated() {
            let color = palette[i % palette.count]
            let pts = s.points.sorted { $0.x < $1.x }
            svg += "<g class=\"series\" data-series=\"\(htmlEscape(s.name))\">"
            var d = ""
            for (k, p) in pts.enumerated() {
                let px = xScale.map(p.x), py = yScale.map(p.y)
                if k == 0 { d += "M\(f(px)),\(f(py))" } else if steps { d += "H\(f(px))V\(f(py))" } else { d += "L\(f(px)),\(f(py))" }
            }
            if pts.count > 1 { svg += "<path class=\"line\" d=\"\(d)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2\"/>" }
            if pts.count <= 60 {
                for p in pts {
                    let px = xScale.map(p.x)
                    if let lo = p.low, let hi = p.high, lo != hi {
                        svg += "<path class=\"whisker\" d=\"M\(f(px)),\(f(yScale.map(lo)))V\(f(yScale.map(hi)))M\(f(px - 4)),\(f(yScale.map(lo)))h8M\(f(px - 4)),\(f(yScale.map(hi)))h8\" stroke=\"\(color)\" stroke-width=\"1\"/>"
                    }
                    svg += "<circle class=\"point\" cx=\"\(f(px))\" cy=\"\(f(yScale.map(p.y)))\" r=\"3\" fill=\"\(color)\"><title>\(htmlEscape(s.name)): \(htmlEscape(axisText(p.x, x.unit))) \(htmlEscape(x.unit)) → \(htmlEscape(axisText(p.y, y.unit))) \(htmlEscape(y.unit))</title></circle>"
                }
            }
            svg += "</g>"
        }
        if many { svg += legend(legendNames) }
        return svg + close(caption)
    }

    /// A bar chart: one bar per label, whiskers where given, y from zero.
    public static func bars(id: String, kind: String, title: String, y: Axis, bars: [Bar], caption: String = "") -> String {
        guard !bars.isEmpty else { return "" }
        let ys = bars.flatMap { [$0.value, $0.low ?? $0.value, $0.high ?? $0.value] }
        let yScale = Scale(values: ys, log: false, includeZero: true, plotLow: height - bottom, plotHigh: top)
        var svg = open(id: id, kind: kind, title: title)
        let plotW = width - left - right
        let slot = plotW / Double(bars.count)
        let barW = min(60, slot * 0.6)
        // Axes: y with ticks; x with one label per bar.
        svg += yAxis(y, yScale)
        svg += "<g class=\"axis x-axis\"><line x1=\"\(f(left))\" y1=\"\(f(height - bottom))\" x2=\"\(f(width - right))\" y2=\"\(f(height - bottom))\" stroke=\"#333\"/>"
        for (i, b) in bars.enumerated() {
            let cx = left + slot * (Double(i) + 0.5)
            svg += "<text class=\"tick-label\" x=\"\(f(cx))\" y=\"\(f(height - bottom + 16))\" text-anchor=\"middle\">\(htmlEscape(shorten(b.label, Int(slot / 6.5))))</text>"
        }
        svg += "</g>"
        let zero = yScale.map(max(0, yScale.low))
        for (i, b) in bars.enumerated() {
            let cx = left + slot * (Double(i) + 0.5)
            let color = palette[i % palette.count]
            let yv = yScale.map(b.value)
            svg += "<g class=\"series\" data-series=\"\(htmlEscape(b.label))\">"
            svg += "<rect class=\"bar\" x=\"\(f(cx - barW / 2))\" y=\"\(f(min(yv, zero)))\" width=\"\(f(barW))\" height=\"\(f(max(1, abs(zero - yv))))\" fill=\"\(color)\"><title>\(htmlEscape(b.label)): \(htmlEscape(axisText(b.value, y.unit))) \(htmlEscape(y.unit))</title></rect>"
            if let lo = b.low, let hi = b.high, lo != hi {
                svg += "<path class=\"whisker\" d=\"M\(f(cx)),\(f(yScale.map(lo)))V\(f(yScale.map(hi)))M\(f(cx - 6)),\(f(yScale.map(lo)))h12M\(f(cx - 6)),\(f(yScale.map(hi)))h12\" stroke=\"#222\" stroke-width=\"1.2\"/>"
            }
            svg += "</g>"
        }
        return svg + close(caption)
    }

    // MARK: pieces

    static func open(id: String, kind: String, title: String, extraHeight: Double = 0) -> String {
        let h = Int(height + extraHeight)
        return "<figure class=\"chart chart-\(kind)\" id=\"\(htmlEscape(id))\"><svg class=\"chart-svg\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 \(Int(width)) \(h)\" width=\"\(Int(width))\" height=\"\(h)\" role=\"img\" aria-labelledby=\"\(htmlEscape(id))-title\"><title id=\"\(htmlEscape(id))-title\">\(htmlEscape(title))</title>"
            + "<text class=\"chart-title\" x=\"\(f(width / 2))\" y=\"18\" text-anchor=\"middle\">\(htmlEscape(shorten(title, 80)))</text>"
    }

    static func close(_ caption: String) -> String {
        "</svg>" + (caption.isEmpty ? "" : "<figcaption>\(htmlEscape(caption))</figcaption>") + "</figure>\n"
    }

    static func axes(x: Axis, xScale: Scale, y: Axis, yScale: Scale) -> String {
        var s = yAxis(y, yScale)
        s += "<g class=\"axis x-axis\"><line x1=\"\(f(left))\" y1=\"\(f(height - bottom))\" x2=\"\(f(width - right))\" y2=\"\(f(height - bottom))\" stroke=\"#333\"/>"
        var ticks = (x.ticks ?? xScale.ticks()).filter { $0 >= xScale.low - 1e-12 * abs(xScale.low) && $0 <= xScale.high + 1e-12 * abs(xScale.high) }
        if ticks.count > 12 { ticks = stride(from: 0, to: ticks.count, by: (ticks.count + 11) / 12).map { ticks[$0] } }
        for t in ticks {
            let px = xScale.map(t)
            s += "<line x1=\"\(f(px))\" y1=\"\(f(height - bottom))\" x2=\"\(f(px))\" y2=\"\(f(height - bottom + 5))\" stroke=\"#333\"/>"
            s += "<text class=\"tick-label\" x=\"\(f(px))\" y=\"\(f(height - bottom + 18))\" text-anchor=\"middle\">\(htmlEscape(axisText(t, x.unit)))</text>"
        }
        s += "<text class=\"axis-label x-label\" x=\"\(f(left + (width - left - right) / 2))\" y=\"\(f(height - 12))\" text-anchor=\"middle\">\(htmlEscape(x.title + (x.log ? ", log scale" : "")))</text></g>"
        return s
    }

    static func yAxis(_ y: Axis, _ yScale: Scale) -> String {
        var s = "<g class=\"axis y-axis\"><line x1=\"\(f(left))\" y1=\"\(f(top))\" x2=\"\(f(left))\" y2=\"\(f(height - bottom))\" stroke=\"#333\"/>"
        for t in y.ticks ?? yScale.ticks() {
            let py = yScale.map(t)
            s += "<line class=\"grid\" x1=\"\(f(left))\" y1=\"\(f(py))\" x2=\"\(f(width - right))\" y2=\"\(f(py))\" stroke=\"#ddd\"/>"
            s += "<text class=\"tick-label\" x=\"\(f(left - 6))\" y=\"\(f(py + 4))\" text-anchor=\"end\">\(htmlEscape(axisText(t, y.unit)))</text>"
        }
        let cy = top + (height - top - bottom) / 2
        s += "<text class=\"axis-label y-label\" x=\"14\" y=\"\(f(cy))\" text-anchor=\"middle\" transform=\"rotate(-90 14 \(f(cy)))\">\(htmlEscape(y.title + (y.log ? ", log scale" : "")))</text></g>"
        return s
    }

    /// The legend sits under the chart, three entries a row, so it never hides a line.
    /// Three legend columns, fewer when the names are long (so they are not cut short).
    static func legendColumns(_ names: [String]) -> Int {
        let longest = names.map(\.count).max() ?? 0
        return longest <= 24 ? 3 : longest <= 40 ? 2 : 1
    }

    static func legendHeight(_ names: [String]) -> Double {
        let cols = legendColumns(names)
        return names.isEmpty ? 0 : Double((names.count + cols - 1) / cols) * 16 + 10
    }

    static func legend(_ names: [String]) -> String {
        var s = "<g class=\"legend\">"
        let cols = legendColumns(names)
        let colW = (width - left - right) / Double(cols)
        for (i, n) in names.enumerated() {
            let x = left + Double(i % cols) * colW
            let y = height + 6 + Double(i / cols) * 16
            s += "<rect x=\"\(f(x))\" y=\"\(f(y - 9))\" width=\"10\" height=\"10\" fill=\"\(palette[i % palette.count])\"/>"
            s += "<text x=\"\(f(x + 14))\" y=\"\(f(y))\">\(htmlEscape(shorten(n, Int(colW / 6.2) - 3)))</text>"
        }
        return s + "</g>"
    }

    /// A linear or logarithmic mapping from data to pixels, padded to nice bounds.
    struct Scale {
        var low: Double
        var high: Double
        let log: Bool
        let plotLow: Double
        let plotHigh: Double

        init(values: [Double], log: Bool, includeZero: Bool, plotLow: Double, plotHigh: Double) {
            let finite = values.filter { $0.isFinite && (!log || $0 > 0) }
            var lo = finite.min() ?? 0, hi = finite.max() ?? 1
            self.log = log && !finite.isEmpty
            if self.log {
                // The data's own range, padded a little: decade bounds would waste most of a
                // plot whose points span a factor of 16.
                if lo == hi { lo /= 2; hi *= 2 }
                let pad = pow(hi / lo, 0.05)
                lo /= pad
                hi *= pad
            } else {
                if includeZero { lo = min(lo, 0); hi = max(hi, 0) }
                if lo == hi { let d = lo == 0 ? 1 : abs(lo) * 0.1; lo -= d; hi += d }
                // hi - lo overflows for data spanning most of the doubles: halve first.
                let step = Scale.niceStep(hi / 5 - lo / 5)
                let nlo = floor(lo / step) * step, nhi = ceil(hi / step) * step
                if nlo.isFinite && nhi.isFinite { lo = nlo; hi = nhi }
            }
            self.low = lo
            self.high = hi
            self.plotLow = plotLow
            self.plotHigh = plotHigh
        }

        func map(_ v: Double) -> Double {
            let frac: Double
            if log { frac = (log10(max(v, low)) - log10(low)) / (log10(high) - log10(low)) }
            else { frac = (v - low) / (high - low) }
            return plotLow + (plotHigh - plotLow) * frac
        }

        /// Tick positions, computed by index and bounded in number: no data (however extreme:
        /// ±1.7e308, denormals) can make this loop long.
        func ticks() -> [Double] {
            if log {
                var t: [Double] = []
                // At most one tick a decade; more than 12 decades: every k-th.
                let firstDecade = max(floor(log10(low)), -307), lastDecade = min(floor(log10(high)), 308)
                guard firstDecade.isFinite, lastDecade.isFinite, firstDecade <= lastDecade else { return [low, high] }
                let decades = lastDecade - firstDecade
                let every = max(1, (decades / 12).rounded(.up))
                var d = firstDecade
                while d <= lastDecade {
                    let v = pow(10, d)
                    for m in decades <= 2 ? [1.0, 2.0, 5.0] : [1.0] where v * m >= low && v * m <= high { t.append(v * m) }
                    d += every
                }
                return t.isEmpty ? [low, high] : t
            }
            let step = Scale.niceStep(high / 5 - low / 5)
            let count = (high / step - low / step).rounded()
            guard count.isFinite, count >= 0, count <= 50 else { return [low, high] }
            return (0...Int(count)).map { i in
                let v = low + Double(i) * step
                return abs(v) < step * 1e-9 ? 0 : v
            }
        }

        static func niceStep(_ raw: Double) -> Double {
            guard raw > 0, raw.isFinite else { return 1 }
            let mag = pow(10, floor(log10(raw)))
            let r = raw / mag
            return (r <= 1 ? 1 : r <= 2 ? 2 : r <= 5 ? 5 : 10) * mag
        }
    }

    /// Tick text: bytes in binary units (64M), other values with k/M/G or plain decimals.
    public static func axisText(_ v: Double, _ unit: String) -> String {
        if v == 0 { return "0" }
        let a = abs(v)
        if unit == "bytes" || unit == "bytes/s" {
            let units: [(Double, String)] = [(1_099_511_627_776, "T"), (1_073_741_824, "G"), (1_048_576, "M"), (1024, "K")]
            for (size, suffix) in units where a >= size { return trim(v / size) + suffix }
            return trim(v)
        }
        if a >= 1e9 { return trim(v / 1e9) + "G" }
        if a >= 1e6 { return trim(v / 1e6) + "M" }
        if a >= 1e4 { return trim(v / 1e3) + "k" }
        if a < 0.001 { return String(format: "%.1e", v) }
        return trim(v)
    }

    static func trim(_ v: Double) -> String {
        var s = String(format: abs(v) >= 100 ? "%.0f" : abs(v) >= 10 ? "%.1f" : abs(v) >= 1 ? "%.2f" : "%.3f", v)
        if s.contains(".") { while s.hasSuffix("0") { s.removeLast() }; if s.hasSuffix(".") { s.removeLast() } }
        return s
    }

    static func f(_ v: Double) -> String {
        guard v.isFinite else { return "0" }
        return String(format: "%.1f", v)
    }

    static func shorten(_ s: String, _ n: Int) -> String {
        let n = max(n, 4)
        return s.count <= n ? s : String(s.prefix(n - 1)) + "…"
    }
}

/// Escapes text for HTML and SVG element content and attribute values.
public func htmlEscape(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.count)
    for c in s {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default: out.append(c)
        }
    }
    return out
}
