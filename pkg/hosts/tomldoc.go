package hosts

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"github.com/pelletier/go-toml/v2"
	"github.com/pelletier/go-toml/v2/unstable"
)

// tomlDoc is a parsed TOML document that remembers where every top-level expression
// sits in the text. go-toml/v2 does not round-trip comments or layout, and these are
// files operators wrote by hand, so every edit splices text at these positions and
// leaves all other bytes alone.
type tomlDoc struct {
	src   []byte
	exprs []tomlExpr
	// data is the decoded document, used to check what an edit changed.
	data map[string]any
}

type tomlExpr struct {
	kind unstable.Kind // unstable.Table, ArrayTable, KeyValue or Comment
	// path is the table header's key for tables, and the enclosing table plus the
	// dotted key for key/values.
	path []string
	// start and end cover whole lines: from the start of the first line to just after
	// the newline that ends the expression (or the end of the input).
	start, end int
	// valStart and valEnd are the raw value's bytes of a key/value.
	valStart, valEnd int
	// inline is true when a key/value's value is an inline table.
	inline bool
}

// parseTOML validates b as TOML and records its expressions. Errors name file:line:col.
func parseTOML(file string, b []byte) (*tomlDoc, error) {
	d := &tomlDoc{src: b}
	if err := toml.Unmarshal(b, &d.data); err != nil {
		return nil, tomlError(file, err)
	}
	if d.data == nil {
		d.data = map[string]any{}
	}
	p := unstable.Parser{KeepComments: true}
	p.Reset(b)
	var table []string
	for p.NextExpression() {
		e := p.Expression()
		x := tomlExpr{kind: e.Kind}
		switch e.Kind {
		case unstable.Comment:
			x.start = lineStart(b, int(e.Raw.Offset))
			x.end = lineEnd(b, int(e.Raw.Offset+e.Raw.Length))
		case unstable.Table, unstable.ArrayTable:
			first, last := -1, 0
			for it := e.Key(); it.Next(); {
				k := it.Node()
				x.path = append(x.path, string(k.Data))
				if first < 0 {
					first = int(k.Raw.Offset)
				}
				last = int(k.Raw.Offset + k.Raw.Length)
			}
			table = x.path
			x.start = lineStart(b, first)
			x.end = lineEnd(b, last)
		case unstable.KeyValue:
			x.path = append(x.path, table...)
			for it := e.Key(); it.Next(); {
				x.path = append(x.path, string(it.Node().Data))
			}
			v := e.Value()
			x.inline = v.Kind == unstable.InlineTable
			x.start = lineStart(b, int(e.Raw.Offset))
			x.end = lineEnd(b, int(e.Raw.Offset+e.Raw.Length))
			x.valEnd = int(e.Raw.Offset + e.Raw.Length)
			x.valStart = valueStart(b, int(e.Raw.Offset), x.valEnd)
		default:
			continue
		}
		d.exprs = append(d.exprs, x)
	}
	if err := p.Error(); err != nil {
		// toml.Unmarshal accepted the document, so this is a parser disagreement;
		// refuse rather than edit text we do not understand.
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return d, nil
}

// valueStart finds the first byte of the value in a key/value spanning [from, to): the
// first non-blank byte after the '=' that follows the key. Keys may be quoted and
// contain '=', so quoted key parts are skipped.
func valueStart(b []byte, from, to int) int {
	i := from
	for i < to {
		switch b[i] {
		case '"', '\'':
			q := b[i]
			i++
			for i < to && b[i] != q {
				if q == '"' && b[i] == '\\' {
					i++
				}
				i++
			}
			i++
		case '=':
			i++
			for i < to && (b[i] == ' ' || b[i] == '\t') {
				i++
			}
			return i
		default:
			i++
		}
	}
	return to
}

// tomlError turns a go-toml error into one that names file:line:col.
func tomlError(file string, err error) error {
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		return fmt.Errorf("%s:%d:%d: %s", file, row, col, de.Error())
	}
	var pe *unstable.ParserError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %s", file, pe.Message)
	}
	return fmt.Errorf("%s: %w", file, err)
}

func lineStart(b []byte, i int) int {
	if i > len(b) {
		i = len(b)
	}
	return bytes.LastIndexByte(b[:i], '\n') + 1
}

func lineEnd(b []byte, i int) int {
	if i >= len(b) {
		return len(b)
	}
	j := bytes.IndexByte(b[i:], '\n')
	if j < 0 {
		return len(b)
	}
	return i + j + 1
}

// lineOf is the 1-based line number of offset i.
func lineOf(b []byte, i int) int {
	if i > len(b) {
		i = len(b)
	}
	return bytes.Count(b[:i], []byte("\n")) + 1
}

// leadStart is where the comment lines directly above expression i begin: a comment
// block with no blank line before a table header belongs to that table.
func (d *tomlDoc) leadStart(i int) int {
	start := d.exprs[i].start
	for j := i - 1; j >= 0; j-- {
		e := d.exprs[j]
		if e.kind != unstable.Comment || e.end != start {
			break
		}
		start = e.start
	}
	return start
}

// find returns the index of the first expression of kind k whose path equals path.
func (d *tomlDoc) find(k unstable.Kind, path ...string) int {
	for i, e := range d.exprs {
		if e.kind == k && equalPath(e.path, path) {
			return i
		}
	}
	return -1
}

func equalPath(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func hasPrefix(path, prefix []string) bool {
	return len(path) >= len(prefix) && equalPath(path[:len(prefix)], prefix)
}

// lookup walks the decoded document along path.
func lookup(m map[string]any, path ...string) (any, bool) {
	var cur any = m
	for _, k := range path {
		t, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = t[k]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// splice returns b with [from, to) replaced by s.
func splice(b []byte, from, to int, s string) []byte {
	out := make([]byte, 0, len(b)-(to-from)+len(s))
	out = append(out, b[:from]...)
	out = append(out, s...)
	return append(out, b[to:]...)
}

// indentOf is the leading blanks of the line starting at i.
func indentOf(b []byte, i int) string {
	j := i
	for j < len(b) && (b[j] == ' ' || b[j] == '\t') {
		j++
	}
	return string(b[i:j])
}

// quoteKey writes a TOML key part, quoting it when it is not a bare key.
func quoteKey(k string) string {
	if k == "" {
		return `""`
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return tomlString(k)
		}
	}
	return k
}

// tomlString writes s as a TOML basic string ("..."), escaping what TOML requires.
func tomlString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			b.WriteString(`\"`)
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\u%04X`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
