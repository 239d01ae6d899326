// How the Postgres.js scripts verify the edge: the connection string's own TLS settings, as the
// README's "TLS" section tells users to do it.
//
// Postgres.js reads `sslmode` from a URL (verify-full: verify the chain and the host name) but not
// `sslrootcert`: it would send it to the server as a setting. So the CA file the URL names is read
// here and passed as `ssl: { ca }` (verification stays on: rejectUnauthorized defaults to true), and
// the parameter is taken out of the URL. node-postgres needs none of this: it reads sslrootcert.
import { readFileSync } from 'node:fs'

export function postgresjsTls (urlText) {
  const url = new URL(urlText)
  const ca = url.searchParams.get('sslrootcert')
  url.searchParams.delete('sslrootcert')
  return { url: url.toString(), options: ca ? { ssl: { ca: readFileSync(ca) } } : {} }
}
