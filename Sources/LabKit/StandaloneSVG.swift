import Foundation

/// The report's charts as standalone SVG files (`memlab report --svg-dir`): for handouts and
/// papers, where a figure is a file, not part of a page. Each file is the chart's own `<svg>`
/// with the report's chart styles inside it and a white background, so it looks the same
/// opened alone.
public enum StandaloneSVG {
    public struct Chart: Equatable, Sendable {
        /// The chart's id in the report (`chart-N-KIND`): the file is named after it.
        public var id: String
        public var title: String
        public var svg: String
    }

    static let style = """
    svg{font:11px system-ui,-apple-system,"Segoe UI",sans-serif;background:#fff}.chart-title{font-size:13px;font-weight:600}
    .axis-label{font-size:12px}.tick-label{fill:#444}.legend text{font-size:11px}
    """

    /// Every chart of a rendered report, in page order.
    public static func charts(in html: String) -> [Chart] {
        var out: [Chart] = []
        var rest = html[...]
        while let fig = rest.range(of: "<figure class=\"chart chart-") {
            let after = rest[fig.upperBound...]
            guard let idStart = after.range(of: "id=\""), let idEnd = after[idStart.upperBound...].firstIndex(of: "\""),
                  let open = after.range(of: "<svg "), let close = after.range(of: "</svg>") else { break }
            let id = String(after[idStart.upperBound..<idEnd])
            var svg = String(after[open.lowerBound..<close.upperBound])
            // The styles go right after the opening tag, before the title.
            if let tagEnd = svg.firstIndex(of: ">") {
                let next = svg.index(after: tagEnd)
                svg.insert(contentsOf: "<style>\(style)</style><rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>", at: next)
            }
            let title = svg.range(of: "<title[^>]*>", options: .regularExpression).flatMap { t in
                svg[t.upperBound...].range(of: "</title>").map { String(svg[t.upperBound..<$0.lowerBound]) }
            } ?? id
            out.append(Chart(id: id, title: title, svg: "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n" + svg + "\n"))
            rest = after[close.upperBound...]
        }
        return out
    }
}
