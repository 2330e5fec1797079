package remotetest

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strings"
	"time"
)

const (
	tokenService = "remotetest-registry"
	tokenIssuer  = "remotetest-token-issuer"
)

// access is one entry of a token's "access" claim.
type access struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

// serveToken is a token server in the style of Docker Hub's: GET with
// optional basic auth, or POST with an OAuth2 password grant. It grants
// the user everything asked for and anonymous clients pull (if allowed).
func (r *Registry) serveToken(w http.ResponseWriter, req *http.Request) {
	var (
		user, pass string
		authed     bool
		scopes     []string
	)
	switch req.Method {
	case http.MethodGet:
		user, pass, authed = req.BasicAuth()
		for _, s := range req.URL.Query()["scope"] {
			scopes = append(scopes, strings.Fields(s)...)
		}
	case http.MethodPost:
		if err := req.ParseForm(); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		if req.PostForm.Get("grant_type") != "password" {
			http.Error(w, `{"error":"unsupported_grant_type"}`, http.StatusBadRequest)
			return
		}
		user, pass, authed = req.PostForm.Get("username"), req.PostForm.Get("password"), true
		scopes = strings.Fields(req.PostForm.Get("scope"))
	default:
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	r.mu.Lock()
	wantUser, wantPass := r.cfg.user, r.cfg.pass
	r.mu.Unlock()
	if authed && (user != wantUser || pass != wantPass) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"errors":[{"code":"UNAUTHORIZED","message":"incorrect username or password"}]}`))
		return
	}
	var grants []access
	for _, s := range scopes {
		parts := strings.Split(s, ":")
		if len(parts) < 3 || parts[0] != "repository" {
			continue
		}
		name := strings.Join(parts[1:len(parts)-1], ":")
		var actions []string
		for _, a := range strings.Split(parts[len(parts)-1], ",") {
			if authed || (a == "pull" && r.cfg.anonymousPull) {
				actions = append(actions, a)
			}
		}
		grants = append(grants, access{Type: "repository", Name: name, Actions: actions})
	}
	subject := user
	if !authed {
		subject = "anonymous"
	}
	tok, err := r.signToken(subject, grants, r.cfg.tokenTTL)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"token":        tok,
		"access_token": tok,
		"expires_in":   int(r.cfg.tokenTTL / time.Second),
		"issued_at":    time.Now().UTC().Format(time.RFC3339),
	})
}

// signToken makes an ES256 JWT the registry's token auth accepts: the
// signing certificate travels in the x5c header and chains to the
// registry's root bundle.
func (r *Registry) signToken(subject string, grants []access, ttl time.Duration) (string, error) {
	now := time.Now()
	header, err := json.Marshal(map[string]any{
		"typ": "JWT",
		"alg": "ES256",
		"x5c": []string{base64.StdEncoding.EncodeToString(r.tokenCert)},
	})
	if err != nil {
		return "", err
	}
	jti := make([]byte, 8)
	rand.Read(jti)
	if grants == nil {
		grants = []access{}
	}
	claims, err := json.Marshal(map[string]any{
		"iss":    tokenIssuer,
		"sub":    subject,
		"aud":    tokenService,
		"exp":    now.Add(ttl).Unix(),
		"nbf":    now.Add(-time.Minute).Unix(),
		"iat":    now.Unix(),
		"jti":    base64.RawURLEncoding.EncodeToString(jti),
		"access": grants,
	})
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString(header) + "." + enc.EncodeToString(claims)
	sum := sha256.Sum256([]byte(signing))
	rr, ss, err := ecdsa.Sign(rand.Reader, r.tokenKey, sum[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	rr.FillBytes(sig[:32])
	ss.FillBytes(sig[32:])
	return signing + "." + enc.EncodeToString(sig), nil
}

// SetPassword changes the password the token server accepts (with
// [WithTokenAuth]), as a credential rotation does. Tokens issued before
// stay valid until they expire.
func (r *Registry) SetPassword(password string) {
	r.mu.Lock()
	r.cfg.pass = password
	r.mu.Unlock()
}
