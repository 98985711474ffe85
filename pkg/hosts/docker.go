package hosts

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
)

const registryMirrorsKey = "registry-mirrors"

// jsonMember is one top-level member of a JSON object and where its bytes are.
type jsonMember struct {
	key              string
	keyStart         int
	valStart, valEnd int
	raw              json.RawMessage
}

// jsonObject is a top-level JSON object with its members in file order.
type jsonObject struct {
	src         []byte
	open, close int // offsets of '{' and '}'
	members     []jsonMember
}

// parseJSONObject reads a top-level object keeping member order and byte positions, so an
// edit can splice one value and leave every other key, value and space as it was.
func parseJSONObject(file string, b []byte) (*jsonObject, error) {
	o := &jsonObject{src: b}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	fail := func(err error) (*jsonObject, error) {
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return nil, fmt.Errorf("%s:%d: %v", file, lineOf(b, int(se.Offset)), se)
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, fmt.Errorf("%s:%d: %v", file, lineOf(b, int(te.Offset)), te)
		}
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s:%d: unexpected end of JSON", file, lineOf(b, len(b)))
		}
		return nil, fmt.Errorf("%s:%d: %w", file, lineOf(b, int(dec.InputOffset())), err)
	}
	tok, err := dec.Token()
	if err != nil {
		return fail(err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fmt.Errorf("%s:%d: want a JSON object at the top level", file, lineOf(b, int(dec.InputOffset())))
	}
	o.open = int(dec.InputOffset()) - 1
	seen := map[string]int{}
	for dec.More() {
		prev := int(dec.InputOffset())
		tok, err := dec.Token()
		if err != nil {
			return fail(err)
		}
		key := tok.(string) // More and Token inside an object only yield string keys
		m := jsonMember{key: key, keyStart: prev + bytes.IndexByte(b[prev:], '"')}
		if line, dup := seen[key]; dup {
			return nil, fmt.Errorf("%s:%d: key %q already set on line %d", file, lineOf(b, m.keyStart), key, line)
		}
		seen[key] = lineOf(b, m.keyStart)
		if err := dec.Decode(&m.raw); err != nil {
			return fail(err)
		}
		m.valEnd = int(dec.InputOffset())
		m.valStart = m.valEnd - len(m.raw)
		o.members = append(o.members, m)
	}
	if _, err := dec.Token(); err != nil {
		return fail(err)
	}
	o.close = int(dec.InputOffset()) - 1
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%s:%d: data after the top-level object", file, lineOf(b, int(dec.InputOffset())))
	}
	return o, nil
}

func (o *jsonObject) member(key string) *jsonMember {
	for i := range o.members {
		if o.members[i].key == key {
			return &o.members[i]
		}
	}
	return nil
}

// mirrors is registry-mirrors' value, or nil when the key is absent.
func (o *jsonObject) mirrors(file string) ([]string, error) {
	m := o.member(registryMirrorsKey)
	if m == nil {
		return nil, nil
	}
	var list []string
	if err := json.Unmarshal(m.raw, &list); err != nil {
		return nil, fmt.Errorf("%s:%d: %q must be a list of URLs", file, lineOf(o.src, m.keyStart), registryMirrorsKey)
	}
	if list == nil {
		list = []string{}
	}
	return list, nil
}

// setMirrors returns the document with registry-mirrors set to list: its value replaced
// where the key is, or the key added as the last member.
func (o *jsonObject) setMirrors(list []string) []byte {
	val := jsonStringList(list)
	if m := o.member(registryMirrorsKey); m != nil {
		return splice(o.src, m.valStart, m.valEnd, val)
	}
	entry := `"` + registryMirrorsKey + `": ` + val
	if len(o.members) == 0 {
		return splice(o.src, o.open, o.close+1, "{\n  "+entry+"\n}")
	}
	last := o.members[len(o.members)-1]
	first := o.members[0]
	if nl := bytes.LastIndexByte(o.src[:first.keyStart], '\n'); nl > o.open {
		// One member per line: add ours on its own line with the same indentation.
		indent := string(o.src[nl+1 : first.keyStart])
		return splice(o.src, last.valEnd, last.valEnd, ",\n"+indent+entry)
	}
	return splice(o.src, last.valEnd, last.valEnd, ", "+entry)
}

// jsonStringList writes ["a", "b"] on one line, as Docker's documentation does.
func jsonStringList(list []string) string {
	parts := make([]string, len(list))
	for i, s := range list {
		b, _ := json.Marshal(s) // a string always marshals
		parts[i] = string(b)
	}
	return "[" + strings.Join(parts, ", ") + "]"
}

// mergeDaemonJSON puts mirror first in daemon.json's registry-mirrors, keeping the other
// mirrors after it and every other key and value, in order. old lists mirror URLs of earlier
// installs to drop. An empty or missing file becomes a new object.
func mergeDaemonJSON(file string, cur []byte, mirror string, old []string) ([]byte, error) {
	if len(bytes.TrimSpace(cur)) == 0 {
		cur = []byte("{}\n")
	}
	o, err := parseJSONObject(file, cur)
	if err != nil {
		return nil, err
	}
	list, err := o.mirrors(file)
	if err != nil {
		return nil, err
	}
	// The user's entries stay exactly as they are, duplicates included, so that
	// uninstall can give the list back unchanged; only ours move or go.
	want := []string{mirror}
	for _, m := range list {
		if m != mirror && !slices.Contains(old, m) {
			want = append(want, m)
		}
	}
	if slices.Equal(list, want) {
		return cur, nil
	}
	b := o.setMirrors(want)
	if err := verifyDaemonJSON(file, cur, b, want); err != nil {
		return nil, err
	}
	return b, nil
}

// unmergeDaemonJSON removes our mirrors from a daemon.json changed since install. When the
// key was not there before install it stays as an empty list: dockerd's reload keeps its
// old mirrors when the key is merely removed.
func unmergeDaemonJSON(file string, cur []byte, mirrors []string) ([]byte, error) {
	o, err := parseJSONObject(file, cur)
	if err != nil {
		return nil, err
	}
	list, err := o.mirrors(file)
	if err != nil || list == nil {
		return cur, err
	}
	want := []string{}
	for _, m := range list {
		if !slices.Contains(mirrors, m) {
			want = append(want, m)
		}
	}
	if slices.Equal(list, want) {
		return cur, nil
	}
	b := o.setMirrors(want)
	if err := verifyDaemonJSON(file, cur, b, want); err != nil {
		return nil, err
	}
	return b, nil
}

// emptyMirrorsDaemonJSON is orig with "registry-mirrors": [] added, what uninstall writes
// when the key was absent before install (see unmergeDaemonJSON).
func emptyMirrorsDaemonJSON(file string, orig []byte) ([]byte, error) {
	if len(bytes.TrimSpace(orig)) == 0 {
		orig = []byte("{}\n")
	}
	o, err := parseJSONObject(file, orig)
	if err != nil {
		return nil, err
	}
	if o.member(registryMirrorsKey) != nil {
		return orig, nil
	}
	return o.setMirrors([]string{}), nil
}

// verifyDaemonJSON checks that the edit changed registry-mirrors and nothing else.
func verifyDaemonJSON(file string, before, after []byte, mirrors []string) error {
	var a, b map[string]any
	if err := json.Unmarshal(before, &a); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	if err := json.Unmarshal(after, &b); err != nil {
		return fmt.Errorf("%s: edited daemon.json does not parse (please report this): %w", file, err)
	}
	if a == nil {
		a = map[string]any{}
	}
	want := make([]any, len(mirrors))
	for i, m := range mirrors {
		want[i] = m
	}
	a[registryMirrorsKey] = want
	if !reflect.DeepEqual(a, b) {
		return fmt.Errorf("%s: editing registry-mirrors would change other settings; refusing (please report this)", file)
	}
	return nil
}
